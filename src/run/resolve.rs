//! Turns a run template plus secrets into ready protocol clients: the only place where CRD types meet
//! protocol clients.

use std::sync::Arc;

use url::Url;

use crate::api::validate::{ServerTiming, TemplateValues};
use crate::api::{self, ClientAuthMethod, ExportLevel, FhirServer, RunTemplate};
use crate::auth::oauth::{Grant, OAuthConfig};
use crate::auth::{self, AuthConfig, SecretString, keys};
use crate::fhir::bulk::{BulkClient, ExportRequest, Level};
use crate::fhir::client::{ClientConfig, HttpClient, build_reqwest};
use crate::pathling::PathlingClient;
use crate::secrets::{SecretError, SecretSource};
use crate::staging::Staging;
use crate::staging::object::{ObjectStaging, S3Config};
use crate::staging::volume::VolumeStaging;

use super::{Failure, Reason};

/// A resolved server: client plus facts the controller reports.
pub struct Resolved<C> {
    pub client: C,
    /// `insecureSkipVerify` in use.
    pub insecure: bool,
    /// Identifies the URL and credential (for the one-export-per-credential rule), without secrets.
    pub key: String,
}

/// Options that come from the operator (not from the CR).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Every `staging.volume.path` must lie under this directory (the operator's `--staging-root`).
    pub staging_root: Option<std::path::PathBuf>,
    /// Where a verification of a pingAndPull sync (which has no staging area) spills its sorted ids
    /// (`--spill-dir`; default: the system's temporary directory).
    pub spill_dir: Option<std::path::PathBuf>,
}

/// Why a run could not be set up, and whether trying again later may help (the Secrets API was
/// unavailable) or not (a Secret is missing, a key is malformed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupError {
    pub failure: Failure,
    pub transient: bool,
}

impl From<Failure> for SetupError {
    fn from(failure: Failure) -> Self {
        Self { failure, transient: false }
    }
}

fn secret_failure(e: SecretError) -> SetupError {
    let transient = matches!(e, SecretError::Unavailable { .. });
    SetupError { failure: Failure::new(Reason::AuthFailed, e.to_string()), transient }
}

async fn secret_string(
    secrets: &dyn SecretSource,
    ns: &str,
    r: &api::SecretKeyRef,
) -> Result<SecretString, SetupError> {
    let raw = secrets.get(ns, r).await.map_err(secret_failure)?;
    let s = String::from_utf8(raw).map_err(|_| {
        SetupError::from(Failure::new(
            Reason::AuthFailed,
            format!("Secret {ns}/{} key {:?} is not UTF-8 text", r.name, r.key),
        ))
    })?;
    Ok(SecretString::new(s.trim_end_matches(['\n', '\r']).to_string()))
}

/// Builds an HTTP client for a server block with its parsed timing.
pub async fn http_client(
    server: &FhirServer,
    timing: &ServerTiming,
    ns: &str,
    secrets: &dyn SecretSource,
    what: &str,
) -> Result<Resolved<HttpClient>, SetupError> {
    let base = Url::parse(&server.url).map_err(|e| {
        Failure::new(Reason::InvalidSpec, format!("{what}.url {:.200?} is not a valid URL: {e}", server.url))
    })?;
    let mut cfg = ClientConfig::new(base.clone());
    cfg.connect_timeout = timing.connect;
    cfg.response_timeout = timing.response;
    cfg.idle_timeout = timing.idle;
    cfg.policy = crate::net::AddressPolicy { allow_link_local: server.allow_link_local };
    cfg.max_requests_per_second = server.max_requests_per_second;
    let mut insecure = false;
    // every secret read goes into a digest that identifies the credentials (never shown)
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    if let Some(t) = &server.tls {
        if let Some(ca) = &t.ca_ref {
            let pem = secrets.get(ns, ca).await.map_err(secret_failure)?;
            digest.update(&pem);
            cfg.ca_pem = Some(pem);
        }
        if let (Some(c), Some(k)) = (&t.client_cert_ref, &t.client_key_ref) {
            let mut pem = secrets.get(ns, c).await.map_err(secret_failure)?;
            pem.push(b'\n');
            pem.extend(secrets.get(ns, k).await.map_err(secret_failure)?);
            digest.update(&pem);
            cfg.client_identity_pem = Some(pem);
        }
        cfg.insecure_skip_verify = t.insecure_skip_verify;
        insecure = t.insecure_skip_verify;
    }
    let mut key = format!("{}|anonymous", server.url.trim_end_matches('/'));
    if let Some(a) = &server.auth {
        let token_url = |u: &Option<String>, field: &str| -> Result<Option<Url>, SetupError> {
            u.as_ref()
                .map(|u| {
                    Url::parse(u).map_err(|e| {
                        SetupError::from(Failure::new(
                            Reason::InvalidSpec,
                            format!("{what}.auth.{field}.tokenUrl {u:.200?} is not a URL: {e}"),
                        ))
                    })
                })
                .transpose()
        };
        let ac = if let Some(b) = &a.bearer_token {
            key = format!("{}|bearer:{}/{}", server.url, b.token_ref.name, b.token_ref.key);
            let token = secret_string(secrets, ns, &b.token_ref).await?;
            digest.update(token.expose().as_bytes());
            Some(AuthConfig::Bearer { token })
        } else if let Some(b) = &a.basic {
            key = format!("{}|basic:{}", server.url, b.username);
            let password = secret_string(secrets, ns, &b.password_ref).await?;
            digest.update(password.expose().as_bytes());
            Some(AuthConfig::Basic { username: b.username.clone(), password })
        } else if let Some(c) = &a.client_credentials {
            key = format!("{}|client:{}", server.url, c.client_id);
            let secret = secret_string(secrets, ns, &c.client_secret_ref).await?;
            digest.update(secret.expose().as_bytes());
            Some(AuthConfig::OAuth(Box::new(OAuthConfig {
                client_id: c.client_id.clone(),
                grant: Grant::ClientSecret { secret, basic: c.client_auth_method == ClientAuthMethod::Basic },
                token_url: token_url(&c.token_url, "clientCredentials")?,
                fhir_base: base.clone(),
                scope: c.scope.clone(),
                what: format!("{what}.auth.clientCredentials"),
            })))
        } else if let Some(c) = &a.smart_backend_services {
            key = format!("{}|smart:{}", server.url, c.client_id);
            let raw = secrets.get(ns, &c.private_key_ref).await.map_err(secret_failure)?;
            digest.update(&raw);
            let signing = keys::parse_private_key(&raw).map_err(|e| {
                SetupError::from(Failure::new(
                    Reason::AuthFailed,
                    format!(
                        "Secret {ns}/{} key {:?} ({what}.auth.smartBackendServices.privateKeyRef): {e}",
                        c.private_key_ref.name, c.private_key_ref.key
                    ),
                ))
            })?;
            Some(AuthConfig::OAuth(Box::new(OAuthConfig {
                client_id: c.client_id.clone(),
                grant: Grant::Assertion { key: signing, key_id: c.key_id.clone() },
                token_url: token_url(&c.token_url, "smartBackendServices")?,
                fhir_base: base.clone(),
                scope: c.scope.clone(),
                what: format!("{what}.auth.smartBackendServices"),
            })))
        } else {
            None
        };
        if let Some(ac) = ac {
            let token_http =
                build_reqwest(&cfg).map_err(|e| Failure::new(Reason::InvalidSpec, format!("{what}.tls: {e}")))?;
            cfg.auth = Some(
                auth::provider(&ac, token_http)
                    .map_err(|e| Failure::new(Reason::AuthFailed, format!("{what}.auth: {e}")))?,
            );
        }
    }
    use base64::Engine;
    cfg.credential_digest = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest.finish().as_ref()[..12]);
    let client = HttpClient::new(&cfg).map_err(|e| Failure::new(Reason::InvalidSpec, format!("{what}.tls: {e}")))?;
    Ok(Resolved { client, insecure, key })
}

/// What a run does: parsed once, from its template and trigger, here — the phases ask this, not
/// which optional fields happen to be set.
#[derive(Debug, Clone, PartialEq)]
pub enum RunKind {
    /// Export (or crawl) from the source, stage, import, apply deletions. A repair is one too: of
    /// some types, from no watermark (its sync does not move the watermark for it).
    Sync,
    /// Pathling exports from the source itself (`$import-pnp`): nothing is staged, no deletions.
    PingAndPull,
    /// Compare the ids of both sides (and delete extras the source confirms gone): nothing imported.
    Verify(api::VerifyRun),
}

impl RunKind {
    /// The kind of a run of template `t` (`verify`: the run's `spec.verify`, for a verification).
    pub fn of(t: &RunTemplate, verify: Option<&api::VerifyRun>) -> Self {
        match verify {
            Some(v) => RunKind::Verify(v.clone()),
            None if t.staging.ping_and_pull.is_some() => RunKind::PingAndPull,
            None => RunKind::Sync,
        }
    }

    /// A verification's options.
    pub fn verify(&self) -> Option<&api::VerifyRun> {
        match self {
            RunKind::Verify(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_verify(&self) -> bool {
        matches!(self, RunKind::Verify(_))
    }
}

/// Everything a run needs, resolved from its template.
pub struct RunSetup {
    pub source: BulkClient,
    pub pathling: PathlingClient,
    pub staging: Option<Arc<dyn Staging>>,
    pub export: ExportRequest,
    /// Bulk export, search, or bulk export where the source has it.
    pub method: api::ExportMethod,
    /// The run's `_since` (absent: a full export).
    pub since: Option<jiff::Timestamp>,
    pub source_url: String,
    pub save_mode: String,
    pub apply_deletes: bool,
    pub max_parallel: usize,
    pub values: TemplateValues,
    pub source_key: String,
    /// Exports at once on the source with this credential (the fair queue's capacity).
    pub source_capacity: usize,
    pub pathling_key: String,
    pub insecure_tls: bool,
    pub kind: RunKind,
}

/// `staging.volume.path` must lie under the operator's `--staging-root` (when it has one).
pub fn check_staging_root(staging: &api::Staging, opts: &Options) -> Result<(), Failure> {
    let (Some(v), Some(root)) = (&staging.volume, &opts.staging_root) else { return Ok(()) };
    let p = std::path::Path::new(&v.path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) || !p.starts_with(root)
    {
        return Err(Failure::new(
            Reason::InvalidSpec,
            format!(
                "spec.staging.volume.path {:.200?} must lie under the operator's --staging-root {:?} (the volume it shares with Pathling)",
                v.path,
                root.display()
            ),
        ));
    }
    Ok(())
}

/// Whether `name` may name a staging folder: a Kubernetes object name (DNS-1123 subdomain).
pub fn is_object_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=253).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..")
}

/// Which run a template is resolved for.
#[derive(Debug, Clone, Copy)]
pub struct Which<'a> {
    pub namespace: &'a str,
    /// The run's name.
    pub run: &'a str,
    /// The run's `_since`.
    pub since: Option<jiff::Timestamp>,
    /// Set for a verification run.
    pub verify: Option<&'a api::VerifyRun>,
}

/// Resolves a run's template for one run.
pub async fn setup(
    t: &RunTemplate,
    values: &TemplateValues,
    which: Which<'_>,
    secrets: &dyn SecretSource,
    opts: &Options,
) -> Result<RunSetup, SetupError> {
    let Which { namespace, run, since, verify } = which;
    let kind = RunKind::of(t, verify);
    if !is_object_name(namespace) || !is_object_name(run) {
        return Err(Failure::new(
            Reason::InvalidSpec,
            format!("run {namespace:.64?}/{run:.64?}: not a valid namespace and object name (lowercase letters, digits, '-', '.')"),
        )
        .into());
    }
    let src = http_client(&t.source, &values.source, namespace, secrets, "source").await?;
    let tgt = http_client(&t.target.server(), &values.target, namespace, secrets, "target").await?;
    let level = match t.export.level {
        ExportLevel::System => Level::System,
        ExportLevel::Patient => Level::Patient,
        ExportLevel::Group => Level::Group(t.export.group_id.clone().ok_or_else(|| {
            Failure::new(Reason::InvalidSpec, "export.groupId is required when export.level is Group")
        })?),
    };
    let export = ExportRequest {
        level,
        types: t.export.types.clone(),
        type_filters: t.export.type_filters.clone(),
        // a verification reads ids only, of everything the sync selects
        elements: if kind.is_verify() { vec!["id".into()] } else { t.export.elements.clone() },
        since: if kind.is_verify() { None } else { since.map(|t| t.to_string()) },
        until: if kind.is_verify() { None } else { t.export.until.as_ref().map(|u| u.0.to_string()) },
    };
    let method = t.export.method;
    if method != api::ExportMethod::BulkExport {
        if kind == RunKind::PingAndPull {
            return Err(Failure::new(
                Reason::InvalidSpec,
                "staging.pingAndPull has Pathling export from the source itself: it cannot read a source by search; \
                 use a volume or object store staging with export.method Search or Auto",
            )
            .into());
        }
        super::crawl::check(&export).map_err(|m| Failure::new(Reason::InvalidSpec, m))?;
    }
    if method == api::ExportMethod::Search && kind.is_verify() {
        return Err(Failure::new(
            Reason::VerifyFailed,
            "a verification compares ids from a bulk export of the source; a sync with export.method Search cannot be \
             verified yet (remove spec.verify, or use BulkExport)",
        )
        .into());
    }
    let staging: Option<Arc<dyn Staging>> = if let Some(v) = &t.staging.volume {
        check_staging_root(&t.staging, opts)?;
        Some(Arc::new(VolumeStaging::new(&v.path, &v.pathling_path, namespace, run)))
    } else if let Some(o) = &t.staging.object_store {
        let get = |r: &Option<api::SecretKeyRef>| {
            let r = r.clone();
            async move {
                match r {
                    Some(r) => {
                        Ok::<_, SetupError>(Some(secret_string(secrets, namespace, &r).await?.expose().to_string()))
                    }
                    None => Ok(None),
                }
            }
        };
        let cfg = S3Config {
            url: o.url.clone(),
            pathling_url: o.pathling_url.clone(),
            endpoint: o.endpoint.clone(),
            region: o.region.clone(),
            access_key_id: get(&o.access_key_id_ref).await?,
            secret_access_key: get(&o.secret_access_key_ref).await?,
        };
        Some(Arc::new(
            ObjectStaging::new(&cfg, namespace, run).map_err(|e| Failure::new(Reason::InvalidSpec, e.to_string()))?,
        ))
    } else if kind.is_verify() {
        // pingAndPull has no staging area: a verification spills its sorted ids locally
        let root = opts.spill_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("fhirsync-spill"));
        let root = root.to_string_lossy().to_string();
        Some(Arc::new(VolumeStaging::new(&root, "file:///unused", namespace, run)))
    } else {
        None
    };
    Ok(RunSetup {
        source: BulkClient::new(src.client),
        pathling: PathlingClient::new(tgt.client).with_generation(generation(t.target.pathling_generation)),
        staging,
        export,
        method,
        since: if kind.is_verify() { None } else { since },
        source_url: t.source.url.clone(),
        save_mode: t.target.save_mode.code().to_string(),
        apply_deletes: t.target.apply_deletes && kind == RunKind::Sync,
        max_parallel: t.max_parallel_downloads.clamp(1, 64) as usize,
        values: *values,
        source_key: src.key,
        source_capacity: t.source.max_concurrent_exports.clamp(1, 64) as usize,
        pathling_key: t.target.url.trim_end_matches('/').to_string(),
        insecure_tls: src.insecure || tgt.insecure,
        kind,
    })
}

/// The generation the spec names (`None`: read it from Pathling).
pub fn generation(g: crate::api::PathlingGeneration) -> Option<crate::pathling::Generation> {
    use crate::api::PathlingGeneration;
    use crate::pathling::Generation;
    match g {
        PathlingGeneration::Auto => None,
        PathlingGeneration::V7 => Some(Generation::V7),
        PathlingGeneration::V3 => Some(Generation::V3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validate::server_timing;
    use crate::secrets::DirSecrets;

    #[tokio::test]
    async fn a_rotated_secret_makes_a_client_with_another_credential_digest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pathling")).unwrap();
        let server: FhirServer = serde_json::from_value(serde_json::json!({"url": "https://p.example/fhir",
            "auth": {"bearerToken": {"tokenRef": {"name": "pathling", "key": "token"}}}}))
        .unwrap();
        let timing = server_timing(&server, "spec.target").unwrap();
        let secrets = DirSecrets::new(dir.path());
        let digest = || async {
            http_client(&server, &timing, "ns", &secrets, "spec.target")
                .await
                .unwrap()
                .client
                .credential_digest()
                .to_string()
        };
        std::fs::write(dir.path().join("pathling/token"), "first-token").unwrap();
        let a = digest().await;
        assert_eq!(a, digest().await, "the same Secret, the same digest");
        std::fs::write(dir.path().join("pathling/token"), "rotated-token").unwrap();
        let b = digest().await;
        assert_ne!(a, b);
        assert!(!a.contains("token") && a.len() == 16, "{a}");
    }
}
