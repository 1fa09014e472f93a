//! Blocks shared by every kind: FHIR server connection, auth, TLS, timeouts, Secret references.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::units::{DURATION_MSG, DURATION_RULE};

/// A reference to one key of a Secret in the custom resource's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace as this resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// How fhirsync authenticates to a FHIR server. At most one method may be set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.bearerToken), has(self.basic), has(self.clientCredentials), has(self.smartBackendServices)].filter(x, x).size() <= 1").message("auth: set at most one of bearerToken, basic, clientCredentials, smartBackendServices"))]
pub struct Auth {
    /// A static bearer token (`Authorization: Bearer <token>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<BearerTokenAuth>,
    /// HTTP Basic authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicAuth>,
    /// OAuth2 client credentials grant with a client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_credentials: Option<ClientCredentialsAuth>,
    /// SMART Backend Services: client credentials with a signed JWT client assertion (RS384 or ES384).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smart_backend_services: Option<SmartBackendServicesAuth>,
}

/// A static bearer token read from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BearerTokenAuth {
    /// Secret key holding the token.
    pub token_ref: SecretKeyRef,
}

/// HTTP Basic credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuth {
    /// User name.
    #[schemars(length(min = 1, max = 1024))]
    pub username: String,
    /// Secret key holding the password.
    pub password_ref: SecretKeyRef,
}

/// How the client secret is presented to the token endpoint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ClientAuthMethod {
    /// `client_id` and `client_secret` in the form body (client_secret_post).
    #[default]
    Form,
    /// HTTP Basic with the client id and secret (client_secret_basic).
    Basic,
}

/// OAuth2 client credentials with a client secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientCredentialsAuth {
    /// OAuth2 client id.
    #[schemars(length(min = 1, max = 1024))]
    pub client_id: String,
    /// Secret key holding the client secret.
    pub client_secret_ref: SecretKeyRef,
    /// Token endpoint. When absent it is discovered from `{url}/.well-known/smart-configuration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// Requested scope.
    #[serde(default = "default_scope")]
    pub scope: String,
    /// `form` (default) or `basic`.
    #[serde(default)]
    pub client_auth_method: ClientAuthMethod,
}

/// SMART Backend Services (signed JWT client assertion).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmartBackendServicesAuth {
    /// Client id registered with the server; used as `iss` and `sub` of the assertion.
    #[schemars(length(min = 1, max = 1024))]
    pub client_id: String,
    /// Secret key holding the private key: PEM (PKCS#8, PKCS#1 or SEC1) or a JWK. RSA keys sign RS384,
    /// P-384 EC keys sign ES384.
    pub private_key_ref: SecretKeyRef,
    /// Key id sent as the JWT header `kid`; must match the key registered in the server's JWKS.
    #[schemars(length(min = 1, max = 1024))]
    pub key_id: String,
    /// Token endpoint. When absent it is discovered from `{url}/.well-known/smart-configuration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// Requested scope (`system/*.read` for SMART v1 servers).
    #[serde(default = "default_scope")]
    pub scope: String,
}

fn default_scope() -> String {
    "system/*.rs".into()
}

/// TLS settings toward a server.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.clientCertRef) == has(self.clientKeyRef)").message("tls: clientCertRef and clientKeyRef go together"))]
pub struct Tls {
    /// PEM bundle of CA certificates trusted in addition to the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_ref: Option<SecretKeyRef>,
    /// PEM client certificate for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_ref: Option<SecretKeyRef>,
    /// PEM private key of the client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_ref: Option<SecretKeyRef>,
    /// Skip server certificate verification. Never use in production; reported by the condition
    /// `InsecureTLS=True` while in use.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// Network timeouts, as Kubernetes-style durations (`90s`, `5m`, `6h`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Time allowed to establish a connection.
    #[serde(default = "default_connect")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MSG))]
    #[schemars(length(max = 32))]
    pub connect: String,
    /// Time allowed until response headers arrive.
    #[serde(default = "default_response")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MSG))]
    #[schemars(length(max = 32))]
    pub response: String,
    /// Longest pause while reading a response body (bodies may take hours in total).
    #[serde(default = "default_idle")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MSG))]
    #[schemars(length(max = 32))]
    pub idle: String,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: default_connect(), response: default_response(), idle: default_idle() }
    }
}

fn default_connect() -> String {
    "10s".into()
}
fn default_response() -> String {
    "60s".into()
}
fn default_idle() -> String {
    "120s".into()
}

/// A FHIR server: its base URL and how to reach it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FhirServer {
    /// FHIR base URL, e.g. `https://fhir.hospital.example/fhir`.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#]+')").message("url must be an absolute http(s) URL"))]
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Credentials; absent means anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
    /// TLS settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// Network timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Longest wait between two polls of an asynchronous job on this server, whatever its
    /// `Retry-After` says (Helios always says 120 s, even for a job done in a second). 1s–1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MSG))]
    #[schemars(length(max = 32))]
    pub max_poll_interval: Option<String>,
    /// As a source: how many exports fhirsync runs at once on this server with this credential,
    /// across all syncs (default 1 — Epic and Cerner allow one per client; HAPI allows many, Helios 4).
    /// Further runs queue, first come first served.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent_exports: u32,
    /// As a source: most requests a second fhirsync sends to this server, across all runs in the
    /// operator with the same URL and credential (polls, downloads, search pages, history). Absent:
    /// no limit beyond the export slots. A `429` is obeyed either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_requests_per_second: Option<u32>,
    /// Allow requests to link-local addresses (169.254.0.0/16, fe80::/10) and cloud metadata services.
    /// Off by default: a manifest's file URL or a redirect that points there is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_link_local: bool,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}
