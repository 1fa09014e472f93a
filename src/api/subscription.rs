//! FhirSubscriptionSync: keeps rest-hook Subscriptions on a source server pointed at Pathling.
#![allow(clippy::duplicated_attributes)] // several printcolumn(...) entries in one #[kube] attribute

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{FhirServer, SecretKeyRef};
use super::conditions::conditions_schema;
use super::units::{DURATION_MSG, DURATION_RULE};

/// Rest-hook Subscriptions on a source server that deliver every change straight into Pathling.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "fhirsync.io",
    version = "v1alpha1",
    kind = "FhirSubscriptionSync",
    plural = "fhirsubscriptionsyncs",
    shortname = "fss",
    category = "fhirsync",
    namespaced,
    status = "FhirSubscriptionSyncStatus",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Active", type_ = "string", json_path = ".status.activeSubscriptions"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct FhirSubscriptionSyncSpec {
    /// The server that will notify (HAPI FHIR, Smile CDR, Firely: R4 rest-hook Subscriptions).
    pub source: FhirServer,
    /// One Subscription per criteria, e.g. `Observation?status=final` or `Patient?` (unique).
    #[schemars(
        length(min = 1, max = 100),
        inner(length(min = 1, max = 1024), pattern(r"^[A-Za-z*\[][^\s]*$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub criteria: Vec<String>,
    /// What the SOURCE calls: Pathling's FHIR base as the source reaches it. The source PUTs
    /// `{endpoint}/{Type}/{id}`.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#]+')").message("endpoint must be an absolute http(s) URL"))]
    #[schemars(length(min = 1, max = 2048))]
    pub endpoint: String,
    /// Secret key holding `Name: value` lines sent as `channel.header` on every delivery (e.g. a
    /// long-lived `Authorization` for Pathling). Never copied into status, events or logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_ref: Option<SecretKeyRef>,
    /// Ask for DELETE notifications (HAPI's `subscription-send-delete-messages` extension).
    #[serde(default)]
    pub send_deletes: bool,
    /// Expiry of the Subscriptions (`Subscription.end`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Time>,
    /// How often each Subscription is read back and repaired.
    #[serde(default = "default_verify")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MSG))]
    #[schemars(length(max = 32))]
    pub verify_interval: String,
}

fn default_verify() -> String {
    "5m".into()
}

/// The state of one Subscription on the source.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionState {
    /// The criteria it serves.
    pub criteria: String,
    /// Its id on the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `requested`, `active`, `error` or `off` (as the source reports it).
    #[serde(default)]
    pub status: String,
    /// The source's `error` text, if any.
    #[serde(default)]
    pub error: String,
    /// When it was last read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified: Option<Time>,
    /// Re-requests after `error`/`off` so far (drives the backoff).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// When it was last re-requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_retry: Option<Time>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Observed state of a FhirSubscriptionSync.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FhirSubscriptionSyncStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Degraded, InsecureTLS.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// `active/total`, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_subscriptions: Option<String>,
    /// One entry per criteria.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionState>,
    /// The source's FHIR version (from its CapabilityStatement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_version: Option<String>,
}
