//! Events as a planner decides them: collected while deciding, published by the actor afterwards
//! (a planner does no I/O).

use kube::Resource;
use kube::runtime::events::EventType;

use super::Context;

/// One Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: String,
    pub action: &'static str,
    pub text: String,
}

impl Note {
    /// A `Normal` Event.
    pub fn normal(reason: &str, action: &'static str, text: impl Into<String>) -> Self {
        Self { warning: false, reason: reason.into(), action, text: text.into() }
    }

    /// A `Warning` Event.
    pub fn warning(reason: &str, action: &'static str, text: impl Into<String>) -> Self {
        Self { warning: true, reason: reason.into(), action, text: text.into() }
    }
}

/// Publishes the notes, in order, on `obj`.
pub async fn publish<K: Resource<DynamicType = ()>>(ctx: &Context, obj: &K, notes: &[Note]) {
    for n in notes {
        let type_ = if n.warning { EventType::Warning } else { EventType::Normal };
        ctx.event(obj, type_, &n.reason, n.action, n.text.clone()).await;
    }
}
