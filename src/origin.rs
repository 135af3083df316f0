//! Where a request goes: its origin, scheme, host and port.
//!
//! Early release is kept per origin, and credentials are sent only to their
//! own origin, so both compare URIs the same way here.

use http::Uri;

/// `scheme://host:port` of `uri`, lowercase, the port made explicit; empty
/// for a URI without authority (every such request shares one key).
pub(crate) fn origin_key(uri: &Uri) -> String {
    let Some(host) = uri.host() else {
        return String::new();
    };
    let scheme = uri.scheme_str().unwrap_or("http");
    let port = uri.port_u16().unwrap_or(match scheme {
        "https" => 443,
        _ => 80,
    });
    format!("{scheme}://{host}:{port}").to_ascii_lowercase()
}

/// Whether `uri` goes to the origin of `key` (made by [`origin_key`]); a URI
/// without authority goes nowhere in particular, so to no origin.
pub(crate) fn is_origin(uri: &Uri, key: &str) -> bool {
    !key.is_empty() && origin_key(uri) == key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uri: &str) -> String {
        origin_key(&uri.parse().unwrap())
    }

    #[test]
    fn origins_differ_by_scheme_host_and_port_only() {
        assert_eq!(key("http://A.test/x"), key("http://a.test:80/y?z"));
        assert_eq!(key("https://a.test/x"), key("https://a.test:443/"));
        assert_ne!(key("http://a.test/x"), key("https://a.test/x"));
        assert_ne!(key("http://a.test:8080/x"), key("http://a.test:8081/x"));
        assert_ne!(key("http://a.test/x"), key("http://b.test/x"));
        assert_eq!(key("/relative"), key("/other"));
    }

    #[test]
    fn a_uri_without_authority_has_no_origin() {
        let own = key("http://a.test:8080");
        assert!(is_origin(&"http://A.test:8080/x".parse().unwrap(), &own));
        assert!(!is_origin(&"http://a.test:8081/x".parse().unwrap(), &own));
        assert!(!is_origin(&"/x".parse().unwrap(), &own));
        assert!(!is_origin(&"/x".parse().unwrap(), &key("/y")));
    }
}
