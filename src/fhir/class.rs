//! THE error vocabulary of fhirsync's protocol edge: what a failed request means. Two readings, each
//! made here and nowhere else:
//!
//! - its [`Class`] — whether another attempt may pass, and why not — read by the run engine's policy
//!   (`run/policy.rs`), the relay's commits, the controllers and `fhirsync check` alike;
//! - whether it says the server does not offer what was asked ([`refuses`]), read where fhirsync has
//!   another way to do the same thing (another search, another history, an export without a
//!   parameter, a crawl instead of `$export`).
//!
//! | class        | what                                                      |
//! |--------------|-----------------------------------------------------------|
//! | Busy         | 429, Pathling's import lock (503), an export cap          |
//! | Transient    | 5xx, 408, OperationOutcome `transient`, broken connection |
//! | Unreachable  | cannot connect / host does not resolve                    |
//! | Auth         | 401, 403, a credential that cannot be produced            |
//! | Unsupported  | the server's generation or kind cannot do this (not sent) |
//! | Permanent    | any other answer, a protocol violation, an over-large body, a refused address |
//! | Invalid      | the configuration cannot work                             |

use super::client::Error;

/// How an error is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Busy,
    Transient,
    Unreachable,
    Auth,
    Unsupported,
    Permanent,
    Invalid,
}

impl Class {
    /// Whether another attempt may succeed without anything changing on fhirsync's side.
    pub fn may_pass(self) -> bool {
        matches!(self, Class::Busy | Class::Transient | Class::Unreachable)
    }

    /// The reason word of a failure of this class toward a server whose "cannot reach" reason is
    /// `unreachable` (`SourceUnreachable`, `TargetUnreachable`), else `otherwise`.
    pub fn reason(self, unreachable: &'static str, otherwise: &'static str) -> &'static str {
        match self {
            Class::Auth => "AuthFailed",
            Class::Invalid => "InvalidSpec",
            Class::Busy | Class::Transient | Class::Unreachable => unreachable,
            Class::Unsupported | Class::Permanent => otherwise,
        }
    }
}

/// Classifies an error: the one place that reads status codes and error kinds for retry decisions.
pub fn classify(e: &Error) -> Class {
    match e {
        Error::Transport { connect: true, .. } => Class::Unreachable,
        Error::Transport { .. } | Error::Timeout { .. } => Class::Transient,
        Error::Status { busy: true, .. } => Class::Busy,
        Error::Status { status: 401 | 403, .. } => Class::Auth,
        Error::Status { transient: true, .. } => Class::Transient,
        Error::Status { .. } => Class::Permanent,
        Error::Auth(_) => Class::Auth,
        Error::Unsupported { .. } => Class::Unsupported,
        Error::Protocol { .. } | Error::TooLarge { .. } | Error::Refused { .. } => Class::Permanent,
        Error::Config(_) => Class::Invalid,
    }
}

/// What a request asked of a server that a server may not offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// The `$export` operation itself (a kick-off): absent (404), not allowed (405), not built (501).
    Operation,
    /// A parameter of an operation (`_elements`, `_typeFilter`): the request is refused as such
    /// (400, 422) or the parameter is not built (501).
    Parameter,
    /// A search by a parameter (`_id`), or a read with one (`_elements`): as [`Ask::Parameter`], and
    /// a type or interaction the server lacks (404, 405), or a format it will not send (406).
    Search,
    /// A `_history` interaction: as [`Ask::Search`], and forbidden to this client (403), gone
    /// (410), or answered with something that is no history Bundle.
    History,
    /// A create the server does not allow this client (a Subscription, a topic): refused as a request
    /// (400, 422), forbidden (403) or not allowed (405).
    Create,
}

/// The status codes that say "not offered" for each [`Ask`]: the one list.
fn refusals(ask: Ask) -> &'static [u16] {
    match ask {
        Ask::Operation => &[404, 405, 501],
        Ask::Parameter => &[400, 422, 501],
        Ask::Search => &[400, 404, 405, 406, 422, 501],
        Ask::History => &[400, 403, 404, 405, 410, 422, 501],
        Ask::Create => &[400, 403, 405, 422],
    }
}

/// Whether a status code says the server does not offer `ask`.
pub fn refuses_status(status: u16, ask: Ask) -> bool {
    refusals(ask).contains(&status)
}

/// Whether an error says the server does not offer `ask` (so that fhirsync may do without it).
/// A busy server refuses nothing: it is waited out (Helios caps exports with a 400).
pub fn refuses(e: &Error, ask: Ask) -> bool {
    match e {
        Error::Status { status, busy: false, .. } => refuses_status(*status, ask),
        Error::Protocol { .. } => ask == Ask::History,
        Error::Unsupported { .. } => true,
        _ => false,
    }
}

/// What a person should do about an auth failure (401: the credentials, 403: their permissions).
pub fn auth_hint(e: &Error) -> Option<&'static str> {
    match e.status() {
        Some(401) => Some("the server rejected the credentials: check the auth block and the Secret it references"),
        Some(403) => Some("the credentials lack permission: grant the client the needed scope or role"),
        _ => None,
    }
}

/// Whether a status code says a resource is not there (any more): 404, 410.
pub fn gone(status: u16) -> bool {
    matches!(status, 404 | 410)
}

/// A status error as a test wants it.
#[cfg(test)]
pub(crate) fn status_error(status: u16, transient: bool, busy: bool, retry: Option<u64>) -> Error {
    Error::Status {
        method: "GET".into(),
        url: "http://s/x".into(),
        status,
        message: "m".into(),
        retry_after: retry.map(std::time::Duration::from_secs),
        transient,
        busy,
    }
}

#[cfg(test)]
mod tests {
    use super::status_error as status;
    use super::*;

    #[test]
    fn classes() {
        let refused = Error::Transport { url: "u".into(), message: "Connection refused".into(), connect: true };
        let table: Vec<(Error, Class)> = vec![
            (refused, Class::Unreachable),
            (Error::Transport { url: "u".into(), message: "reset".into(), connect: false }, Class::Transient),
            (Error::Timeout { url: "u".into(), secs: 1 }, Class::Transient),
            (status(429, false, true, None), Class::Busy),
            (status(503, true, true, None), Class::Busy),
            (status(500, true, false, None), Class::Transient),
            (status(401, false, false, None), Class::Auth),
            (status(403, false, false, None), Class::Auth),
            (status(404, false, false, None), Class::Permanent),
            (status(400, false, false, None), Class::Permanent),
            (Error::Protocol { url: "u".into(), message: "html".into() }, Class::Permanent),
            (Error::Unsupported { url: "u".into(), what: "$import-pnp".into() }, Class::Unsupported),
            (Error::Config("x".into()), Class::Invalid),
        ];
        for (e, want) in table {
            assert_eq!(classify(&e), want, "{e}");
        }
    }

    #[test]
    fn what_each_ask_takes_as_not_offered() {
        let p = || Error::Protocol { url: "u".into(), message: "not a Bundle".into() };
        type Case = (&'static str, Error, Ask, bool);
        let table: Vec<Case> = vec![
            ("no $export at all", status(404, false, false, None), Ask::Operation, true),
            ("$export not allowed", status(405, false, false, None), Ask::Operation, true),
            (
                "a kick-off refused as a request is no missing operation",
                status(400, false, false, None),
                Ask::Operation,
                false,
            ),
            ("a parameter refused", status(400, false, false, None), Ask::Parameter, true),
            ("a parameter not built", status(501, false, false, None), Ask::Parameter, true),
            ("Helios's export cap (a busy 400) refuses nothing", status(400, false, true, None), Ask::Parameter, false),
            ("a server error is no refusal", status(500, true, false, None), Ask::Search, false),
            ("a search format not offered", status(406, false, false, None), Ask::Search, true),
            ("a history forbidden to this client", status(403, false, false, None), Ask::History, true),
            ("a search forbidden is an auth failure", status(403, false, false, None), Ask::Search, false),
            ("a history that is no Bundle", p(), Ask::History, true),
            ("a search answer that is no Bundle is an error", p(), Ask::Search, false),
        ];
        for (what, e, ask, want) in table {
            assert_eq!(refuses(&e, ask), want, "{what}");
        }
        assert!(gone(404) && gone(410) && !gone(400));
    }

    #[test]
    fn reasons_follow_the_class() {
        assert_eq!(Class::Auth.reason("SourceUnreachable", "SubscriptionError"), "AuthFailed");
        assert_eq!(Class::Transient.reason("SourceUnreachable", "SubscriptionError"), "SourceUnreachable");
        assert_eq!(Class::Permanent.reason("SourceUnreachable", "SubscriptionError"), "SubscriptionError");
        assert!(Class::Busy.may_pass() && !Class::Unsupported.may_pass());
    }
}
