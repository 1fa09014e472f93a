//! Turns a BulkExportSync spec plus secrets into ready protocol clients: the only place where CRD
//! types meet protocol clients.

use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::api::{self, BulkExportSyncSpec, ClientAuthMethod, ExportLevel, FhirServer, parse_duration};
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
}

fn secret_failure(e: SecretError) -> Failure {
    Failure::new(Reason::AuthFailed, e.to_string())
}

async fn secret_string(secrets: &dyn SecretSource, ns: &str, r: &api::SecretKeyRef) -> Result<SecretString, Failure> {
    let raw = secrets.get(ns, r).await.map_err(secret_failure)?;
    let s = String::from_utf8(raw).map_err(|_| {
        Failure::new(Reason::AuthFailed, format!("Secret {ns}/{} key {:?} is not UTF-8 text", r.name, r.key))
    })?;
    Ok(SecretString::new(s.trim_end_matches(['\n', '\r']).to_string()))
}

/// Builds an HTTP client for a server block.
pub async fn http_client(
    server: &FhirServer,
    ns: &str,
    secrets: &dyn SecretSource,
    what: &str,
) -> Result<Resolved<HttpClient>, Failure> {
    let base = Url::parse(&server.url).map_err(|e| {
        Failure::new(Reason::InvalidSpec, format!("{what}.url {:?} is not a valid URL: {e}", server.url))
    })?;
    let mut cfg = ClientConfig::new(base.clone());
    let mut insecure = false;
    if let Some(t) = &server.tls {
        if let Some(ca) = &t.ca_ref {
            cfg.ca_pem = Some(secrets.get(ns, ca).await.map_err(secret_failure)?);
        }
        if let (Some(c), Some(k)) = (&t.client_cert_ref, &t.client_key_ref) {
            let mut pem = secrets.get(ns, c).await.map_err(secret_failure)?;
            pem.push(b'\n');
            pem.extend(secrets.get(ns, k).await.map_err(secret_failure)?);
            cfg.client_identity_pem = Some(pem);
        }
        cfg.insecure_skip_verify = t.insecure_skip_verify;
        insecure = t.insecure_skip_verify;
    }
    if let Some(t) = &server.timeouts {
        let d = |s: &str, f: &str| -> Result<Duration, Failure> {
            parse_duration(s).map_err(|e| Failure::new(Reason::InvalidSpec, format!("{what}.timeouts.{f}: {e}")))
        };
        cfg.connect_timeout = d(&t.connect, "connect")?;
        cfg.response_timeout = d(&t.response, "response")?;
        cfg.idle_timeout = d(&t.idle, "idle")?;
    }
    let mut key = format!("{}|anonymous", server.url.trim_end_matches('/'));
    if let Some(a) = &server.auth {
        let token_url = |u: &Option<String>, field: &str| -> Result<Option<Url>, Failure> {
            u.as_ref()
                .map(|u| {
                    Url::parse(u).map_err(|e| {
                        Failure::new(
                            Reason::InvalidSpec,
                            format!("{what}.auth.{field}.tokenUrl {u:?} is not a URL: {e}"),
                        )
                    })
                })
                .transpose()
        };
        let ac = if let Some(b) = &a.bearer_token {
            key = format!("{}|bearer:{}/{}", server.url, b.token_ref.name, b.token_ref.key);
            Some(AuthConfig::Bearer { token: secret_string(secrets, ns, &b.token_ref).await? })
        } else if let Some(b) = &a.basic {
            key = format!("{}|basic:{}", server.url, b.username);
            Some(AuthConfig::Basic {
                username: b.username.clone(),
                password: secret_string(secrets, ns, &b.password_ref).await?,
            })
        } else if let Some(c) = &a.client_credentials {
            key = format!("{}|client:{}", server.url, c.client_id);
            Some(AuthConfig::OAuth(Box::new(OAuthConfig {
                client_id: c.client_id.clone(),
                grant: Grant::ClientSecret {
                    secret: secret_string(secrets, ns, &c.client_secret_ref).await?,
                    basic: c.client_auth_method == ClientAuthMethod::Basic,
                },
                token_url: token_url(&c.token_url, "clientCredentials")?,
                fhir_base: base.clone(),
                scope: c.scope.clone(),
                what: format!("{what}.auth.clientCredentials"),
            })))
        } else if let Some(c) = &a.smart_backend_services {
            key = format!("{}|smart:{}", server.url, c.client_id);
            let raw = secrets.get(ns, &c.private_key_ref).await.map_err(secret_failure)?;
            let signing = keys::parse_private_key(&raw).map_err(|e| {
                Failure::new(
                    Reason::AuthFailed,
                    format!(
                        "Secret {ns}/{} key {:?} ({what}.auth.smartBackendServices.privateKeyRef): {e}",
                        c.private_key_ref.name, c.private_key_ref.key
                    ),
                )
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
    let client = HttpClient::new(&cfg).map_err(|e| Failure::new(Reason::InvalidSpec, format!("{what}.tls: {e}")))?;
    Ok(Resolved { client, insecure, key })
}

/// Everything a run needs, resolved from the sync's spec.
pub struct RunSetup {
    pub source: BulkClient,
    pub pathling: PathlingClient,
    pub staging: Option<Arc<dyn Staging>>,
    pub export: ExportRequest,
    pub source_url: String,
    pub save_mode: String,
    pub apply_deletes: bool,
    pub max_parallel: usize,
    pub run_timeout: Duration,
    pub source_key: String,
    pub pathling_key: String,
    pub insecure_tls: bool,
}

/// `staging.volume.path` must lie under the operator's `--staging-root` (when it has one).
pub fn check_staging_root(spec: &BulkExportSyncSpec, opts: &Options) -> Result<(), Failure> {
    let (Some(v), Some(root)) = (&spec.staging.volume, &opts.staging_root) else { return Ok(()) };
    let p = std::path::Path::new(&v.path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) || !p.starts_with(root)
    {
        return Err(Failure::new(
            Reason::InvalidSpec,
            format!(
                "spec.staging.volume.path {:?} must lie under the operator's --staging-root {:?} (the volume it shares with Pathling)",
                v.path,
                root.display()
            ),
        ));
    }
    Ok(())
}

/// Resolves a sync's spec for one run named `run` in `namespace`; `since` is the run's `_since`.
pub async fn setup(
    spec: &BulkExportSyncSpec,
    namespace: &str,
    run: &str,
    since: Option<jiff::Timestamp>,
    secrets: &dyn SecretSource,
    opts: &Options,
) -> Result<RunSetup, Failure> {
    let src = http_client(&spec.source, namespace, secrets, "source").await?;
    let tgt = http_client(&spec.target.server(), namespace, secrets, "target").await?;
    let level = match spec.export.level {
        ExportLevel::System => Level::System,
        ExportLevel::Patient => Level::Patient,
        ExportLevel::Group => Level::Group(spec.export.group_id.clone().ok_or_else(|| {
            Failure::new(Reason::InvalidSpec, "export.groupId is required when export.level is Group")
        })?),
    };
    let export = ExportRequest {
        level,
        types: spec.export.types.clone(),
        type_filters: spec.export.type_filters.clone(),
        elements: spec.export.elements.clone(),
        since: since.map(|t| t.to_string()),
    };
    let staging: Option<Arc<dyn Staging>> = if let Some(v) = &spec.staging.volume {
        check_staging_root(spec, opts)?;
        Some(Arc::new(VolumeStaging::new(&v.path, &v.pathling_path, namespace, run)))
    } else if let Some(o) = &spec.staging.object_store {
        let get = |r: &Option<api::SecretKeyRef>| {
            let r = r.clone();
            async move {
                match r {
                    Some(r) => {
                        Ok::<_, Failure>(Some(secret_string(secrets, namespace, &r).await?.expose().to_string()))
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
    } else {
        None
    };
    let run_timeout =
        parse_duration(&spec.run_timeout).map_err(|e| Failure::new(Reason::InvalidSpec, format!("runTimeout: {e}")))?;
    Ok(RunSetup {
        source: BulkClient::new(src.client),
        pathling: PathlingClient::new(tgt.client),
        staging,
        export,
        source_url: spec.source.url.clone(),
        save_mode: spec.target.save_mode.code().to_string(),
        apply_deletes: spec.target.apply_deletes && spec.staging.ping_and_pull.is_none(),
        max_parallel: spec.max_parallel_downloads.clamp(1, 64) as usize,
        run_timeout,
        source_key: src.key,
        pathling_key: spec.target.url.trim_end_matches('/').to_string(),
        insecure_tls: src.insecure || tgt.insecure,
    })
}
