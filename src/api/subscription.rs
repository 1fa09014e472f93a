//! FhirSubscriptionSync: keeps Subscriptions on a source server so that every change reaches
//! Pathling — directly (the source PUTs into Pathling) or through fhirsync's relay.
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
    printcolumn(name = "Delivery", type_ = "string", json_path = ".spec.delivery"),
    printcolumn(name = "Active", type_ = "string", json_path = ".status.activeSubscriptions"),
    printcolumn(name = "Applied", type_ = "integer", json_path = ".status.relay.applied", priority = "1"),
    printcolumn(name = "Last change", type_ = "date", json_path = ".status.relay.lastApplied", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = "1"
    )
)]
#[x_kube(validation = Rule::new(DELIVERY_RULE).message(DELIVERY_MSG))]
#[serde(rename_all = "camelCase")]
pub struct FhirSubscriptionSyncSpec {
    /// The server that will notify.
    pub source: FhirServer,
    /// `Direct` (default): the source PUTs each change into Pathling itself (HAPI, Smile CDR, Firely),
    /// at `endpoint`. `Relay`: the source notifies fhirsync's receiver, which writes the changes into
    /// `target` in batches — for every kind of source (topic-based R4 Backport/R4B/R5 servers such as
    /// Helios, Medplum, and classic rest-hook servers alike).
    #[serde(default)]
    pub delivery: Delivery,
    /// With `Relay`: the Pathling server the relay writes into, with its own credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<FhirServer>,
    /// The BulkExportSync (same namespace, same source and target) that is run, as
    /// `fhirsync.io/run-now` does, when changes were missed. With `Relay`: when the relay knows it
    /// missed some (a gap in event numbers, an `error` status, an `empty` payload, a change it could
    /// not apply). With `Direct`: fhirsync watches that sync's Pathling (every 15 s) and runs it when
    /// Pathling answers again after it did not — the source gives up on deliveries that failed for
    /// long enough (HAPI after about a minute) and its Subscription stays `active`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUp>,
    /// One Subscription per criteria, e.g. `Observation?status=final` or `Patient?` (unique).
    #[schemars(
        length(min = 1, max = 100),
        inner(length(min = 1, max = 1024), pattern(r"^[A-Za-z*\[][^\s]*$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub criteria: Vec<String>,
    /// With `Direct` only: what the SOURCE calls — Pathling's FHIR base as the source reaches it. The
    /// source PUTs `{endpoint}/{Type}/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#]+')").message("endpoint must be an absolute http(s) URL"))]
    #[schemars(length(min = 1, max = 2048))]
    pub endpoint: Option<String>,
    /// With `Direct` only: Secret key holding `Name: value` lines sent as `channel.header` on every
    /// delivery (e.g. a long-lived `Authorization` for Pathling). Never copied into status, events or
    /// logs. (With `Relay`, fhirsync puts its own per-sync credential there.)
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

/// CEL rule: what each delivery mode needs.
pub const DELIVERY_RULE: &str = "self.delivery == 'Relay' ? (has(self.target) && !has(self.endpoint) && !has(self.headersRef)) : (has(self.endpoint) && !has(self.target))";
/// Message of [`DELIVERY_RULE`].
pub const DELIVERY_MSG: &str = "delivery Direct needs endpoint (and takes no target); delivery Relay needs target (and takes no endpoint or headersRef)";

/// How changes reach Pathling.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Delivery {
    /// The source writes into Pathling (`PUT {endpoint}/{Type}/{id}`).
    #[default]
    Direct,
    /// The source notifies fhirsync's receiver, which writes into `target` in batches.
    Relay,
}

/// The BulkExportSync that catches up what push missed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CatchUp {
    /// A BulkExportSync in the same namespace.
    pub bulk_export_sync_ref: super::run::SyncRef,
}

/// The state of one Subscription on the source.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionState {
    /// The criteria it serves.
    pub criteria: String,
    /// `rest-hook` (classic R4 criteria), `topic` (R4 Backport, R4B, R5: notification Bundles), or
    /// `medplum` (POST of the resource).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// For `topic`: the SubscriptionTopic's canonical URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Its id on the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `requested`, `active`, `error` or `off` (as the source reports it).
    #[serde(default)]
    pub status: String,
    /// When it entered that status (as fhirsync saw it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
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
    /// With `Relay`: what the relay received and wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayStatus>,
    /// With `Direct` and `catchUp`: since when the catch-up sync's Pathling has not answered (the
    /// source's deliveries fail meanwhile). Cleared, with a catch-up run, once it answers again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_unavailable_since: Option<Time>,
}

/// What the relay did for one FhirSubscriptionSync.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayStatus {
    /// Changes received (notifications with a change, PUTs, DELETEs, POSTs).
    pub received: i64,
    /// Changes written into Pathling.
    pub applied: i64,
    /// Changes that could not be applied (each triggers a catch-up).
    pub failed: i64,
    /// Writes to Pathling (batches and DELETEs).
    pub writes: i64,
    /// Handshakes and heartbeats received.
    #[serde(default)]
    pub heartbeats: i64,
    /// The last event number seen per Subscription id (topic-based sources).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub last_event_numbers: std::collections::BTreeMap<String, i64>,
    /// When the last change reached Pathling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied: Option<Time>,
    /// Seconds from the change at the source to Pathling's acceptance, for the last change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Catch-up runs requested.
    #[serde(default)]
    pub catch_ups: i64,
    /// What the relay knows it missed last, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_missed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_missed_time: Option<Time>,
}
