//! Where requests may go. Below every protocol client: the process-wide TLS provider, and the address
//! policy that keeps a peer (a manifest's file URLs, a redirect, a `next` link) from steering fhirsync
//! at link-local addresses and cloud metadata services. The policy is checked on every URL before a
//! request is sent (literal addresses, metadata host names) and again on every address a host name
//! resolves to, at connect time (so DNS cannot smuggle one in).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Once;

use url::{Host, Url};

/// Installs the process-wide TLS crypto provider (ring) once.
pub fn init_tls() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Which addresses requests may reach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Allow link-local addresses (169.254.0.0/16, fe80::/10) and cloud metadata endpoints.
    pub allow_link_local: bool,
}

/// Host names of cloud metadata services (reached by name rather than address).
const METADATA_HOSTS: &[&str] =
    &["metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"];

const HINT: &str = "set allowLinkLocal: true on this server if it really lives there";

impl AddressPolicy {
    /// Why `ip` is refused, if it is.
    pub fn refuse_ip(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allow_link_local {
            return None;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(v4) if v4 == Ipv4Addr::new(169, 254, 169, 254) => Some("a cloud metadata address"),
            // Alibaba Cloud and Oracle Cloud metadata services
            IpAddr::V4(v4) if v4 == Ipv4Addr::new(100, 100, 100, 200) || v4 == Ipv4Addr::new(192, 0, 0, 192) => {
                Some("a cloud metadata address")
            }
            IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
            IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() => Some("not a host address"),
            IpAddr::V6(v6) if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => {
                Some("a cloud metadata address")
            }
            IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("a link-local address"),
            IpAddr::V6(v6) if v6.is_unspecified() => Some("not a host address"),
            _ => None,
        }
    }

    /// Checks a URL before a request: its scheme, a literal address, a metadata host name.
    pub fn check_url(&self, url: &Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("refused: only http and https URLs are followed, not {}:", url.scheme()));
        }
        let why = match url.host() {
            Some(Host::Ipv4(v4)) => self.refuse_ip(IpAddr::V4(v4)),
            Some(Host::Ipv6(v6)) => self.refuse_ip(IpAddr::V6(v6)),
            Some(Host::Domain(d)) if !self.allow_link_local => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                METADATA_HOSTS.contains(&d.as_str()).then_some("a cloud metadata host")
            }
            Some(Host::Domain(_)) => None,
            None => Some("a URL without a host"),
        };
        match why {
            Some(w) => Err(format!("refused: {} is {w} ({HINT})", url.host_str().unwrap_or(""))),
            None => Ok(()),
        }
    }

    /// Filters resolved addresses; an error when none is left.
    pub fn filter_resolved(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
        let total = addrs.len();
        let mut why = None;
        let kept: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.refuse_ip(a.ip()) {
                Some(w) => {
                    why = Some(w);
                    false
                }
                None => true,
            })
            .collect();
        if kept.is_empty() && total > 0 {
            return Err(format!("refused: {host} resolves only to {} ({HINT})", why.unwrap_or("refused addresses")));
        }
        Ok(kept)
    }
}

/// A DNS resolver for reqwest that applies an [`AddressPolicy`] to every resolved address.
#[derive(Clone, Debug)]
pub struct PolicyResolver {
    pub policy: AddressPolicy,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = policy.filter_resolved(&host, addrs).map_err(std::io::Error::other)?;
            let it: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(it)
        })
    }
}

/// A body over a cap, or a broken body stream.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the answer broke off: {0}")]
    Broken(String),
}

/// Reads a whole response body of at most `limit` bytes; a bigger one is refused without keeping it.
/// The buffer grows by doubling but never past `limit`, so the peak is the body, not twice the cap.
pub async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<bytes::Bytes, BodyError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut out: Vec<u8> = Vec::with_capacity(resp.content_length().map(|n| n as usize).unwrap_or(8 * 1024).min(limit));
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let need = out.len() + chunk.len();
                if need > limit {
                    return Err(BodyError::TooLarge(limit));
                }
                if need > out.capacity() {
                    let target = need.max(out.capacity().saturating_mul(2)).min(limit);
                    out.reserve_exact(target - out.len());
                }
                out.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(out.into()),
            Err(e) => return Err(BodyError::Broken(e.without_url().to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_and_metadata_are_refused_by_default() {
        let p = AddressPolicy::default();
        for u in [
            "http://169.254.169.254/latest/meta-data/",
            "http://169.254.10.1/x",
            "http://[fe80::1]/x",
            "http://[fd00:ec2::254]/x",
            "http://[::ffff:169.254.169.254]/x",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://100.100.100.200/latest",
            "http://0.0.0.0:80/",
            "file:///etc/passwd",
        ] {
            assert!(p.check_url(&Url::parse(u).unwrap()).is_err(), "{u} should be refused");
        }
        for u in ["http://127.0.0.1:8080/fhir", "https://fhir.example/fhir", "http://10.0.0.5/x", "http://[::1]/x"] {
            assert!(p.check_url(&Url::parse(u).unwrap()).is_ok(), "{u} should be allowed");
        }
        let open = AddressPolicy { allow_link_local: true };
        assert!(open.check_url(&Url::parse("http://169.254.169.254/").unwrap()).is_ok());
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let p = AddressPolicy::default();
        let a: SocketAddr = "169.254.169.254:0".parse().unwrap();
        let b: SocketAddr = "10.1.2.3:0".parse().unwrap();
        assert_eq!(p.filter_resolved("h", vec![a, b]).unwrap(), vec![b]);
        let e = p.filter_resolved("evil.example", vec![a]).unwrap_err();
        assert!(e.contains("evil.example") && e.contains("metadata"), "{e}");
    }
}
