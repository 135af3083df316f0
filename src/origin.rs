//! Where a request goes: its origin, scheme, host and port.
//!
//! Early release is kept per origin, and credentials are sent only to their
//! own origin, so both compare URIs the same way here.

use http::Uri;

/// `scheme://host:port` of `uri`, lowercase, the port made explicit; empty
/// for a URI without authority (every such request shares one key).
pub(crate) fn origin_key(uri: &Uri) -> String {
    match parts(uri) {
        Some((scheme, host, port)) => format!("{scheme}://{host}:{port}").to_ascii_lowercase(),
        None => String::new(),
    }
}

/// Whether `uri` goes to the origin of `key` (made by [`origin_key`]); a URI
/// without authority goes nowhere in particular, so to no origin. Checked on
/// every attempt that may carry credentials, so it allocates nothing.
#[cfg(any(feature = "client", feature = "outbox"))]
pub(crate) fn is_origin(uri: &Uri, key: &str) -> bool {
    let (Some((scheme, host, port)), Some((key_scheme, key_authority))) =
        (parts(uri), key.split_once("://"))
    else {
        return false;
    };
    let Some((key_host, key_port)) = key_authority.rsplit_once(':') else {
        return false;
    };
    scheme.eq_ignore_ascii_case(key_scheme)
        && host.eq_ignore_ascii_case(key_host)
        && key_port.parse() == Ok(port)
}

/// Whether `uri` holds credentials: user information before its host
/// (`http://user:password@host/`). The one check of it: a client's base
/// URL, a request handed to the outbox and one enqueued are refused alike.
#[cfg(any(feature = "client", feature = "outbox"))]
pub(crate) fn has_user_info(uri: &Uri) -> bool {
    uri.authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
}

/// Scheme, host and port (the scheme's default if none is given).
fn parts(uri: &Uri) -> Option<(&str, &str, u16)> {
    let host = uri.host()?;
    let scheme = uri.scheme_str().unwrap_or("http");
    let port = uri.port_u16().unwrap_or(match scheme {
        "https" => 443,
        _ => 80,
    });
    Some((scheme, host, port))
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
    #[cfg(any(feature = "client", feature = "outbox"))]
    fn a_uri_without_authority_has_no_origin() {
        let own = key("http://a.test:8080");
        assert!(is_origin(&"http://A.test:8080/x".parse().unwrap(), &own));
        assert!(!is_origin(&"http://a.test:8081/x".parse().unwrap(), &own));
        assert!(!is_origin(&"https://a.test:8080/x".parse().unwrap(), &own));
        assert!(!is_origin(&"http://b.test:8080/x".parse().unwrap(), &own));
        let ipv6 = key("http://[::1]/");
        assert!(is_origin(&"http://[::1]:80/x".parse().unwrap(), &ipv6));
        assert!(!is_origin(&"/x".parse().unwrap(), &own));
        assert!(!is_origin(&"/x".parse().unwrap(), &key("/y")));
    }
}
