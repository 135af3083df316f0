//! The connection string's parameters read here, taken out before
//! tokio-postgres reads the rest: it refuses the names it does not know,
//! and knows only three of libpq's `sslmode`s.
//!
//! Both forms tokio-postgres reads are split as it splits them, so that
//! both agree on where a parameter starts: a `postgres://` (or
//! `postgresql://`) URL, its credentials up to the first `@`, its query
//! after the next `?`; and a `key=value` string, values quoted with `'`
//! and escaped with `\`.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

/// The parameters libpq or tokio-postgres know: any other name is refused
/// here, without quoting it (in a malformed string, what is taken for a
/// name may be part of a password); tokio-postgres names those of these it
/// does not support.
const KNOWN: &[&str] = &[
    "application_name",
    "channel_binding",
    "client_encoding",
    "connect_timeout",
    "dbname",
    "fallback_application_name",
    "gssdelegation",
    "gssencmode",
    "gsslib",
    "host",
    "hostaddr",
    "keepalives",
    "keepalives_count",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "krbsrvname",
    "load_balance_hosts",
    "max_protocol_version",
    "min_protocol_version",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_issuer",
    "oauth_scope",
    "options",
    "passfile",
    "password",
    "port",
    "replication",
    "require_auth",
    "requirepeer",
    "requiressl",
    "service",
    "ssl_max_protocol_version",
    "ssl_min_protocol_version",
    "sslcert",
    "sslcertmode",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslkey",
    "sslkeylogfile",
    "sslmode",
    "sslnegotiation",
    "sslpassword",
    "sslrootcert",
    "sslsni",
    "target_session_attrs",
    "tcp_user_timeout",
    "user",
];

/// Refuses a parameter name no one knows.
fn known(name: &str) -> Result<(), String> {
    if KNOWN.contains(&name) {
        Ok(())
    } else {
        Err(
            "a parameter libpq does not know (its name is not shown, lest it be part of a \
             password: check each name's spelling)"
                .to_owned(),
        )
    }
}

/// The values of the parameters read here; the last one given wins, as in
/// libpq.
#[derive(Default, Debug, PartialEq)]
pub(super) struct Ours {
    pub(super) ssl_mode: Option<String>,
    pub(super) ssl_root_cert: Option<String>,
    pub(super) statement_timeout: Option<String>,
    pub(super) lock_timeout: Option<String>,
}

impl Ours {
    /// Keeps `value` if `key` is read here; whether it is.
    fn take(
        &mut self,
        key: &str,
        value: impl FnOnce() -> Result<String, String>,
    ) -> Result<bool, String> {
        let slot = match key {
            "sslmode" => &mut self.ssl_mode,
            "sslrootcert" => &mut self.ssl_root_cert,
            "statement_timeout" => &mut self.statement_timeout,
            "lock_timeout" => &mut self.lock_timeout,
            _ => return Ok(false),
        };
        *slot = Some(value()?);
        Ok(true)
    }
}

/// `url` without the parameters read here, and their values. The errors
/// never quote the string: it may hold a password.
pub(super) fn split(url: &str) -> Result<(String, Ours), String> {
    match ["postgres://", "postgresql://"]
        .iter()
        .find(|prefix| url.starts_with(*prefix))
    {
        Some(prefix) => split_url(url, prefix.len()),
        None => split_key_values(url),
    }
}

/// A URL's query, where tokio-postgres finds it: after the first `?` that
/// follows the credentials (everything up to the first `@`).
fn split_url(url: &str, prefix: usize) -> Result<(String, Ours), String> {
    let mut ours = Ours::default();
    let host = url[prefix..].find('@').map_or(prefix, |at| prefix + at + 1);
    let Some(question) = url[host..].find('?') else {
        return Ok((url.to_owned(), ours));
    };
    let query = host + question + 1;
    let mut kept = Vec::new();
    let mut rest = &url[query..];
    while !rest.is_empty() {
        // A key up to `=`, its value up to `&`: tokio-postgres's reading.
        let Some((key, after)) = rest.split_once('=') else {
            // Left for tokio-postgres to refuse ("unterminated parameter").
            kept.push(rest);
            break;
        };
        let (value, next) = after.split_once('&').unwrap_or((after, ""));
        let pair = &rest[..key.len() + 1 + value.len()];
        rest = next;
        let name = percent_decode_str(key)
            .decode_utf8()
            .map_err(|_| "a parameter name that is not UTF-8".to_owned())?;
        let decoded = || {
            percent_decode_str(value)
                .decode_utf8()
                .map(Cow::into_owned)
                .map_err(|_| format!("the value of `{name}` is not UTF-8"))
        };
        if !ours.take(&name, decoded)? {
            known(&name)?;
            kept.push(pair);
        }
    }
    let mut rest = url[..query - 1].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, ours))
}

/// A `key=value` string, read as tokio-postgres reads one; the parameters
/// kept are written back quoted, so that what it reads is well formed. The
/// errors name no key either: in a malformed string, a word taken for a
/// key may be part of a password.
fn split_key_values(text: &str) -> Result<(String, Ours), String> {
    let mut ours = Ours::default();
    let mut kept = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|&c| !c.is_whitespace() && c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err("a parameter without `=`".to_owned());
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let quoted = chars.next_if_eq(&'\'').is_some();
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\'') if quoted => break,
                Some(c) if !quoted && c.is_whitespace() => break,
                Some('\\') => value.extend(chars.next()),
                Some(c) => value.push(c),
                None if quoted => return Err("a quoted value not closed by `'`".to_owned()),
                None => break,
            }
        }
        if !quoted && value.is_empty() {
            return Err("a parameter without a value".to_owned());
        }
        if !ours.take(&key, || Ok(value.clone()))? {
            known(&key)?;
            let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{key}='{escaped}'"));
        }
    }
    Ok((kept.join(" "), ours))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_ok(url: &str) -> (String, Ours) {
        split(url).unwrap()
    }

    #[test]
    fn a_url_loses_the_parameters_read_here_and_keeps_the_others_in_order() {
        let (rest, ours) = split_ok(
            "postgres://u:p@db:5432/app?sslmode=verify-full&application_name=a&sslrootcert=%2Fetc%2Fca.pem\
             &connect_timeout=3&statement_timeout=1s&lock_timeout=500ms",
        );
        assert_eq!(
            rest,
            "postgres://u:p@db:5432/app?application_name=a&connect_timeout=3"
        );
        assert_eq!(
            ours,
            Ours {
                ssl_mode: Some("verify-full".into()),
                ssl_root_cert: Some("/etc/ca.pem".into()),
                statement_timeout: Some("1s".into()),
                lock_timeout: Some("500ms".into()),
            }
        );
    }

    #[test]
    fn a_url_left_with_no_parameter_loses_its_question_mark() {
        let (rest, ours) = split_ok("postgresql://db/app?sslmode=require");
        assert_eq!(rest, "postgresql://db/app");
        assert_eq!(ours.ssl_mode.as_deref(), Some("require"));
        assert_eq!(split_ok("postgres://db/app").0, "postgres://db/app");
    }

    #[test]
    fn reserved_characters_in_the_password_are_not_taken_for_the_query() {
        let url = "postgres://u:p?sslmode=disable#/x@db/app?sslmode=verify-ca";
        let (rest, ours) = split_ok(url);
        assert_eq!(rest, "postgres://u:p?sslmode=disable#/x@db/app");
        assert_eq!(ours.ssl_mode.as_deref(), Some("verify-ca"));
    }

    #[test]
    fn the_last_value_given_wins_as_in_libpq() {
        let (_, ours) = split_ok("postgres://db/app?sslmode=disable&sslmode=require");
        assert_eq!(ours.ssl_mode.as_deref(), Some("require"));
    }

    #[test]
    fn a_value_that_is_not_utf8_is_refused_without_quoting_it() {
        let error = split("postgres://u:hunter2@db/app?sslrootcert=%FF").unwrap_err();
        assert_eq!(error, "the value of `sslrootcert` is not UTF-8");
    }

    #[test]
    fn a_key_value_string_loses_the_parameters_read_here_and_keeps_the_others_quoted() {
        let (rest, ours) = split_ok(
            "host=db  user = u password='it\\'s a \\\\secret' sslmode=verify-ca sslrootcert='/a b/ca.pem'",
        );
        assert_eq!(rest, "host='db' user='u' password='it\\'s a \\\\secret'");
        assert_eq!(ours.ssl_mode.as_deref(), Some("verify-ca"));
        assert_eq!(ours.ssl_root_cert.as_deref(), Some("/a b/ca.pem"));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some("it's a \\secret".as_bytes()));
    }

    #[test]
    fn an_unknown_parameter_is_refused_without_its_name() {
        for url in [
            "postgres://u:p@ss@db/app?hunter2=x",
            "host=db password=hunter2 secret=x",
        ] {
            let error = split(url).unwrap_err();
            assert!(
                !error.contains("hunter2") && !error.contains("secret"),
                "{error}"
            );
            assert!(error.contains("libpq does not know"), "{error}");
        }
        assert!(split("postgres://db/app?sslcert=/c.pem").is_ok());
    }

    #[test]
    fn a_malformed_key_value_string_is_refused_without_quoting_its_values() {
        for text in [
            "host=db password='hunter2",
            "host=db password=hunter2 secret",
            "host=db password=hunter2 secret=",
        ] {
            let error = split(text).unwrap_err();
            assert!(
                !error.contains("hunter2") && !error.contains("secret"),
                "{error}"
            );
        }
    }
}
