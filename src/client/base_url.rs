//! The base URL of a client: checked once when it is built, and shown in an
//! error or `Debug` with its credentials, query and fragment redacted.

use http::Uri;

use super::error::Error;
use crate::origin::has_user_info;

/// The longest base URL accepted, in bytes.
const MAX_BASE_URL: usize = 2048;

/// `scheme://authority/prefix`, without a trailing slash, from the base URL.
pub(super) fn base_url(base_url: &str) -> Result<String, Error> {
    let shown = shown_url(base_url);
    let invalid = |reason: &str| Error::config(format!("base URL {shown:?} {reason}"), None);
    if base_url.len() > MAX_BASE_URL {
        return Err(invalid("is longer than 2048 bytes"));
    }
    let uri: Uri = base_url
        .parse()
        .map_err(|_: http::uri::InvalidUri| invalid("is not a URL"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(invalid("is not absolute (scheme and host)"));
    };
    match scheme {
        "http" => {}
        "https" if cfg!(feature = "rustls") => {}
        "https" => return Err(invalid("needs the `rustls` feature for https")),
        _ => return Err(invalid("is neither http nor https")),
    }
    if has_user_info(&uri) {
        return Err(invalid(
            "carries credentials (user info): pass a token with `token()` instead",
        ));
    }
    if authority.host().is_empty() {
        return Err(invalid("has no host"));
    }
    // `http::Uri` takes any digits for a port, and a bare `:`.
    let port = authority
        .as_str()
        .rsplit_once(']')
        .map_or(authority.as_str(), |(_, after_ipv6)| after_ipv6)
        .split_once(':')
        .map(|(_, port)| port);
    if let Some(port) = port {
        if !matches!(port.parse::<u16>(), Ok(1..)) {
            return Err(invalid("has a port outside 1 to 65535"));
        }
    }
    // `http::Uri` drops a fragment without a word.
    if uri.query().is_some() || base_url.contains('#') {
        return Err(invalid("has a query or a fragment"));
    }
    let prefix = uri.path().trim_end_matches('/');
    Ok(format!("{scheme}://{authority}{prefix}"))
}

/// `url` as it can be shown in an error or `Debug`: its user info, as far as
/// the last `@` (a password may hold `/`, `?`, `#` or `@`), and its query or
/// fragment (`?token=...`) replaced by `[redacted]`. Where a `?` or `#`
/// comes before that `@`, nothing tells a password from a query: all but
/// the scheme is redacted.
pub(super) fn shown_url(url: &str) -> String {
    use crate::response::REDACTED;
    let is_scheme = |scheme: &str| {
        scheme
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'-' | b'.'))
    };
    let after_scheme = url
        .find("://")
        .filter(|&at| is_scheme(&url[..at]))
        .map_or(0, |at| at + 3);
    let (scheme, rest) = url.split_at(after_scheme);
    let query = rest.find(['?', '#']);
    let (user_info, rest) = match rest.rfind('@') {
        Some(at) if query.is_some_and(|query| query < at) => return format!("{scheme}{REDACTED}"),
        Some(at) => (REDACTED, &rest[at..]),
        None => ("", rest),
    };
    match rest.find(['?', '#']) {
        Some(at) => format!("{scheme}{user_info}{}{REDACTED}", &rest[..=at]),
        None => format!("{scheme}{user_info}{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::ErrorKind;
    use super::*;

    #[test]
    fn base_urls_keep_their_prefix_and_lose_the_trailing_slash() {
        assert_eq!(
            base_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            base_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            base_url("http://127.0.0.1:8080/tenant/").unwrap(),
            "http://127.0.0.1:8080/tenant"
        );
    }

    #[test]
    fn bad_base_urls_are_configuration_errors() {
        for bad in [
            "",
            "not a url",
            "/api",
            "127.0.0.1:8080",
            "ftp://127.0.0.1",
            "http://127.0.0.1/?x=1",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:65536",
            "http://127.0.0.1:0",
            "http://127.0.0.1:",
            "http://:80",
            "http://127.0.0.1/#fragment",
            "http://[::1]:0/",
        ] {
            let error = base_url(bad).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Config, "{bad:?}: {error}");
            assert!(!error.is_transient());
        }
        assert_eq!(base_url("http://[::1]:8080/").unwrap(), "http://[::1]:8080");
        assert_eq!(base_url("http://h:65535").unwrap(), "http://h:65535");
    }

    #[test]
    fn credentials_in_the_base_url_are_refused_and_never_shown() {
        for bad in [
            "http://user:pa55word@127.0.0.1:8080/x",
            "http://user:pa55word@127.0.0.1:99999/x",
            "http://user:pa55word@ho st/x",
        ] {
            let error = base_url(bad).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Config, "{bad:?}: {error}");
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains("pa55word"), "{shown}");
        }
    }

    #[test]
    fn user_info_and_queries_are_never_shown() {
        for (url, shown) in [
            ("http://h:80/api", "http://h:80/api"),
            ("http://u:p/w@x@h:80/api", "http://[redacted]@h:80/api"),
            ("http://u:p#w/?@h:80/api", "http://[redacted]"),
            ("http://h:80/api?token=t#f", "http://h:80/api?[redacted]"),
            ("http://h/api#t", "http://h/api#[redacted]"),
            ("http://u:p@h/a?token=t", "http://[redacted]@h/a?[redacted]"),
            ("http://h/api?mail=a@b&token=t", "http://[redacted]"),
            ("u:p://w@h", "[redacted]@h"),
        ] {
            assert_eq!(shown_url(url), shown, "{url}");
        }
    }

    #[test]
    fn https_needs_the_rustls_feature() {
        assert_eq!(
            base_url("https://127.0.0.1").is_ok(),
            cfg!(feature = "rustls")
        );
    }
}
