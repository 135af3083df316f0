//! Connecting to PostgreSQL from a connection string, as libpq does: over
//! TLS as `sslmode` and `sslrootcert` ask, and with every wait bounded.
//!
//! [`Target::parse`] reads a `postgres://` URL or a `key=value` string as
//! tokio-postgres does, except for these parameters, read here:
//!
//! - `sslmode`: `disable` (never TLS), `prefer` (TLS when the server
//!   offers it: the default, as in libpq), `require` (TLS or no
//!   connection), `verify-ca` (and the server's certificate chains to a
//!   trusted root), `verify-full` (and it names the host connected to).
//!   `require` and `prefer` check the certificate as `verify-ca` does when
//!   `sslrootcert` is given, as libpq does when it finds a root file; they
//!   look for no default file. `prefer` does not retry without TLS after
//!   a failed handshake, unlike libpq.
//! - `sslrootcert`: a PEM file of the roots to trust, or `system` (the
//!   platform's trust store, which then asks for `verify-full`, as in
//!   libpq). `verify-ca` and `verify-full` without it trust the platform's
//!   roots: a database on another machine is reached over TLS checked by
//!   default, with a private CA installed on the machine or named here.
//! - `connect_timeout` (seconds, libpq's name): connecting, the TLS
//!   handshake and the login, together; 10 s when missing or 0.
//! - `statement_timeout` and `lock_timeout` (PostgreSQL's durations:
//!   `5s`, `500ms`, `0` for no limit), set on the session through its
//!   startup `options`, unless `options` sets them already: 5 s and 2 s
//!   when missing. No statement then waits for ever on a lock another
//!   session holds, or on a server that never finishes.
//!
//! The TLS is rustls on the ring provider, the crate's own.
//! [`Target::connect`] connects and drives the connection on the current
//! runtime. No error quotes the connection string, which may hold a
//! password; a [`Target`] shows the server without it.

mod params;
mod tls;

use std::{error::Error, fmt, time::Duration};

use tokio_postgres::{
    config::{Host, SslMode},
    tls::MakeTlsConnect,
    Client, Config, Socket,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use self::tls::{Check, Roots};

/// How long connecting, the TLS handshake and the login may take together,
/// unless `connect_timeout` says.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The session's `statement_timeout` unless the string sets it: well above
/// what any statement of the crate takes, well below a stalled delivery.
const DEFAULT_STATEMENT_TIMEOUT: &str = "5s";
/// The session's `lock_timeout` unless the string sets it: a lock held
/// longer (a `CREATE INDEX` without `CONCURRENTLY`) fails the statement
/// rather than holding up the sends behind it.
const DEFAULT_LOCK_TIMEOUT: &str = "2s";

/// A connection to a server, not yet driven: for a caller that polls its
/// messages itself (notifications).
pub(crate) type Connection =
    tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// A server to connect to, read from a connection string, with its TLS
/// set up and its bounds; cheap to clone. Its `Display` is a URL without
/// the password: `postgres://user@host:port/database`.
#[derive(Clone)]
pub(crate) struct Target {
    config: Config,
    tls: MakeRustlsConnect,
    mode: Mode,
    /// Where the trusted roots come from, when the certificate is checked.
    roots: Option<String>,
    connect_timeout: Duration,
}

impl Target {
    /// Reads `url`, and the trusted roots it names (a file, or the
    /// platform's).
    ///
    /// # Errors
    ///
    /// [`ConnectError::Invalid`]: the string cannot be read, names a
    /// parameter no one knows, or a value that is not one (an `sslmode`,
    /// a duration), the roots cannot be loaded.
    pub(crate) fn parse(url: &str) -> Result<Target, ConnectError> {
        let invalid = ConnectError::Invalid;
        let (rest, ours) = params::split(url).map_err(invalid)?;
        let mut config: Config = rest
            .parse()
            .map_err(|error: tokio_postgres::Error| invalid(with_sources(&error)))?;
        // What tokio-postgres takes for a host when the password holds an
        // unencoded `@`: it would be shown with the server.
        if config
            .get_hosts()
            .iter()
            .any(|host| matches!(host, Host::Tcp(name) if name.contains('@')))
        {
            return Err(invalid(
                "a host name holds `@`: write an `@` of the password as %40".to_owned(),
            ));
        }
        let roots = match ours.ssl_root_cert.as_deref() {
            None => None,
            Some("system") => Some(Roots::System),
            Some(path) => Some(Roots::File(path)),
        };
        let mode = match ours.ssl_mode.as_deref() {
            Some(name) => Mode::parse(name).map_err(invalid)?,
            None if roots == Some(Roots::System) => Mode::VerifyFull,
            None => Mode::Prefer,
        };
        if roots == Some(Roots::System) && mode != Mode::VerifyFull {
            return Err(invalid(format!(
                "sslmode={} may not be used with sslrootcert=system: use verify-full",
                mode.name()
            )));
        }
        let (check, roots) = match (mode, roots) {
            (Mode::Disable, _) | (Mode::Prefer | Mode::Require, None) => (Check::Nothing, None),
            (Mode::Prefer | Mode::Require | Mode::VerifyCa, roots) => {
                let roots = roots.unwrap_or(Roots::System);
                (Check::Chain(roots.load().map_err(invalid)?), Some(roots))
            }
            (Mode::VerifyFull, roots) => {
                let roots = roots.unwrap_or(Roots::System);
                (
                    Check::ChainAndName(roots.load().map_err(invalid)?),
                    Some(roots),
                )
            }
        };
        // Over a Unix socket PostgreSQL offers no TLS, and libpq ignores
        // `sslmode`.
        let sockets_only = config.get_hostaddrs().is_empty()
            && !config.get_hosts().is_empty()
            && !config
                .get_hosts()
                .iter()
                .any(|host| matches!(host, Host::Tcp(_)));
        config.ssl_mode(match mode {
            _ if sockets_only => SslMode::Disable,
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        });
        let options = session_options(config.get_options(), &ours)?;
        config.options(&options);
        let connect_timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        Ok(Target {
            config,
            tls: tls::connector(check).map_err(invalid)?,
            mode,
            roots: roots.map(|roots| roots.to_string()),
            connect_timeout,
        })
    }

    /// Connects, with the TLS and the login, within the bound; the
    /// connection is driven on the current runtime until the client is
    /// dropped or the server closes it.
    ///
    /// # Errors
    ///
    /// [`ConnectError::Tls`], [`ConnectError::TimedOut`] or
    /// [`ConnectError::Failed`], as [`Target::connect_undriven`].
    pub(crate) async fn connect(&self) -> Result<Client, ConnectError> {
        let (client, connection) = self.connect_undriven().await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "a PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// Connects, with the TLS and the login, within the bound; the caller
    /// drives the connection (polling it, for its messages).
    ///
    /// # Errors
    ///
    /// The TLS failed or was refused ([`ConnectError::Tls`]), no connection
    /// and login within the bound ([`ConnectError::TimedOut`]), or the
    /// network or the server refused ([`ConnectError::Failed`]).
    pub(crate) async fn connect_undriven(&self) -> Result<(Client, Connection), ConnectError> {
        let connecting = self.config.connect(self.tls.clone());
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(connected) => connected.map_err(|error| self.failure(error)),
            Err(_) => Err(ConnectError::TimedOut(self.connect_timeout)),
        }
    }

    /// The error of a failed connection: a TLS failure said as one.
    fn failure(&self, error: tokio_postgres::Error) -> ConnectError {
        if let Some(refused) = rustls_error(&error) {
            use rustls::{CertificateError as Certificate, Error::InvalidCertificate};
            let roots = self.roots.as_deref().unwrap_or("the trusted roots");
            return ConnectError::Tls(match refused {
                InvalidCertificate(Certificate::UnknownIssuer | Certificate::BadSignature) => {
                    format!("certificate not trusted: no root of {roots} issued it ({refused})")
                }
                InvalidCertificate(
                    Certificate::NotValidForName | Certificate::NotValidForNameContext { .. },
                ) => format!(
                    "host name mismatch, which sslmode={} refuses: {refused}",
                    self.mode.name()
                ),
                refused => refused.to_string(),
            });
        }
        // tokio-postgres's own TLS errors: a server without TLS when it is
        // required, mainly.
        if error.to_string() == "error performing TLS handshake" {
            let reason = error.source().map(ToString::to_string).unwrap_or_default();
            return ConnectError::Tls(if reason == "server does not support TLS" {
                format!(
                    "the server does not offer TLS, which sslmode={} requires",
                    self.mode.name()
                )
            } else {
                reason
            });
        }
        ConnectError::Failed(error)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self.config.get_user().unwrap_or_default();
        let mut servers: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|host| match host {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(socket) => socket.display().to_string(),
            })
            .collect();
        if servers.is_empty() {
            servers = (self.config.get_hostaddrs().iter())
                .map(ToString::to_string)
                .collect();
        }
        if servers.is_empty() {
            // tokio-postgres refuses to connect to no server.
            servers.push("localhost".to_owned());
        }
        let ports = self.config.get_ports();
        write!(f, "postgres://{user}@")?;
        for (index, server) in servers.iter().enumerate() {
            let comma = if index > 0 { "," } else { "" };
            let port = ports.get(index).or(ports.first()).copied().unwrap_or(5432);
            if server.contains(':') && !server.starts_with('/') {
                write!(f, "{comma}[{server}]:{port}")?;
            } else {
                write!(f, "{comma}{server}:{port}")?;
            }
        }
        let database = self.config.get_dbname().unwrap_or(user);
        write!(f, "/{database}")
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("server", &format_args!("{self}"))
            .field("sslmode", &self.mode.name())
            .field("roots", &self.roots)
            .field("connect_timeout", &self.connect_timeout)
            .field("options", &self.config.get_options())
            .finish()
    }
}

/// libpq's `sslmode`s, but `allow`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::Disable,
        Mode::Prefer,
        Mode::Require,
        Mode::VerifyCa,
        Mode::VerifyFull,
    ];

    fn parse(name: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|mode| mode.name() == name)
            .ok_or_else(|| {
                format!(
                    "sslmode `{name}` is not one of disable, prefer, require, verify-ca, verify-full"
                )
            })
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

/// The session's startup `options`: `given`, and `statement_timeout` and
/// `lock_timeout` unless it sets them.
fn session_options(given: Option<&str>, ours: &params::Ours) -> Result<String, ConnectError> {
    let given = given.unwrap_or_default();
    let mut options = given.to_owned();
    for (setting, value, default) in [
        (
            "statement_timeout",
            ours.statement_timeout.as_deref(),
            DEFAULT_STATEMENT_TIMEOUT,
        ),
        (
            "lock_timeout",
            ours.lock_timeout.as_deref(),
            DEFAULT_LOCK_TIMEOUT,
        ),
    ] {
        let value = match (value, sets(given, setting)) {
            (Some(_), true) => {
                return Err(ConnectError::Invalid(format!(
                    "{setting} is given twice: as a parameter and in options"
                )))
            }
            (None, true) => continue,
            (Some(value), false) => duration(setting, value)?,
            (None, false) => default,
        };
        if !options.is_empty() {
            options.push(' ');
        }
        options.push_str(&format!("-c {setting}={value}"));
    }
    Ok(options)
}

/// Whether startup `options` set `setting`: `-c name=value`,
/// `-cname=value` or `--name=value`, words split at white space unless
/// escaped by `\`, names in any case with `-` for `_`, as PostgreSQL reads
/// them.
fn sets(options: &str, setting: &str) -> bool {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    words.push(word);
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let assignment = match word.as_str() {
            "-c" => words.next().map(String::as_str),
            word => word.strip_prefix("-c").or_else(|| word.strip_prefix("--")),
        };
        let name = assignment.and_then(|assignment| assignment.split('=').next());
        if name.is_some_and(|name| name.replace('-', "_").eq_ignore_ascii_case(setting)) {
            return true;
        }
    }
    false
}

/// `value` if it is a duration PostgreSQL reads, with nothing that could
/// end the option: digits and a unit.
fn duration<'a>(setting: &str, value: &'a str) -> Result<&'a str, ConnectError> {
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    if (1..=10).contains(&digits)
        && ["", "us", "ms", "s", "min", "h", "d"].contains(&&value[digits..])
    {
        Ok(value)
    } else {
        Err(ConnectError::Invalid(format!(
            "{setting} `{value}` is not a duration such as 5s, 500ms or 0 (no limit)"
        )))
    }
}

/// The rustls error under a failed handshake: tokio-rustls's I/O error
/// holds it (as its inner error, which `io::Error::source` skips).
fn rustls_error(error: &tokio_postgres::Error) -> Option<&rustls::Error> {
    error
        .source()?
        .downcast_ref::<std::io::Error>()?
        .get_ref()?
        .downcast_ref::<rustls::Error>()
}

/// `error` and its sources: tokio-postgres says only its kind at the top.
fn with_sources(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Why a connection could not be made. No variant quotes the connection
/// string.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// The connection string cannot be used: why.
    Invalid(String),
    /// TLS failed or was refused: the certificate not trusted, a host
    /// name it does not name, no TLS offered where it is required.
    Tls(String),
    /// No connection, TLS and login within this bound.
    TimedOut(Duration),
    /// The network or the server refused the connection or the login.
    Failed(tokio_postgres::Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Invalid(reason) => write!(f, "invalid connection string: {reason}"),
            ConnectError::Tls(reason) => write!(f, "TLS to the server failed: {reason}"),
            ConnectError::TimedOut(bound) => write!(
                f,
                "no connection, TLS handshake and login within {} s (connect_timeout)",
                bound.as_secs_f64()
            ),
            ConnectError::Failed(error) => f.write_str(&with_sources(error)),
        }
    }
}

impl Error for ConnectError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> Target {
        Target::parse(url).unwrap()
    }

    fn invalid(url: &str) -> String {
        match Target::parse(url) {
            Err(error @ ConnectError::Invalid(_)) => error.to_string(),
            other => panic!("not refused as invalid: {other:?}"),
        }
    }

    #[test]
    fn the_default_is_prefer_with_the_bounds_set_on_the_session() {
        let target = parsed("postgres://u:hunter2@db/app");
        assert_eq!(target.mode, Mode::Prefer);
        assert_eq!(target.config.get_ssl_mode(), SslMode::Prefer);
        assert_eq!(target.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(
            target.config.get_options(),
            Some("-c statement_timeout=5s -c lock_timeout=2s")
        );
    }

    #[test]
    fn the_bounds_are_read_from_the_string() {
        let target = parsed(
            "postgres://db/app?connect_timeout=3&statement_timeout=250ms&lock_timeout=0\
             &options=-c%20search_path%3Dq",
        );
        assert_eq!(target.connect_timeout, Duration::from_secs(3));
        assert_eq!(
            target.config.get_options(),
            Some("-c search_path=q -c statement_timeout=250ms -c lock_timeout=0")
        );
        let keys = parsed("host=db connect_timeout=0 lock_timeout=1min");
        assert_eq!(keys.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(
            keys.config.get_options(),
            Some("-c statement_timeout=5s -c lock_timeout=1min")
        );
    }

    #[test]
    fn options_that_set_a_bound_keep_it_and_may_not_be_contradicted() {
        for options in [
            "-c%20statement_timeout%3D9s",
            "-cstatement_timeout%3D9s",
            "--statement-timeout%3D9s",
            "-c%20Statement_Timeout%3D9s",
        ] {
            let target = parsed(&format!("postgres://db/app?options={options}"));
            let set = target.config.get_options().unwrap();
            assert!(!set.contains("statement_timeout=5s"), "{set}");
            assert!(set.ends_with("-c lock_timeout=2s"), "{set}");
        }
        let twice = invalid("postgres://db/app?options=-c%20lock_timeout%3D1s&lock_timeout=2s");
        assert!(twice.contains("lock_timeout is given twice"), "{twice}");
    }

    #[test]
    fn a_bound_that_is_not_a_duration_is_refused() {
        for value in [
            "5%20s",
            "-1",
            "5s%20-c%20x%3Dy",
            "s",
            "12345678901ms",
            "5sec",
        ] {
            let error = invalid(&format!("postgres://db/app?statement_timeout={value}"));
            assert!(error.contains("is not a duration"), "{error}");
        }
        assert!(Target::parse("postgres://db/app?statement_timeout=90min").is_ok());
    }

    #[test]
    fn sslmode_verify_modes_are_required_tls_and_unknown_modes_are_refused() {
        let require = parsed("postgres://db/app?sslmode=require");
        assert_eq!(require.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(require.roots, None);
        let disable = parsed("postgres://db/app?sslmode=disable&sslrootcert=/missing.pem");
        assert_eq!(disable.config.get_ssl_mode(), SslMode::Disable);
        for mode in ["allow", "verify_full", "VERIFY-FULL"] {
            let error = invalid(&format!("postgres://db/app?sslmode={mode}"));
            assert!(error.contains("is not one of"), "{error}");
        }
    }

    #[test]
    fn sslrootcert_system_asks_for_verify_full() {
        let error = invalid("postgres://db/app?sslrootcert=system&sslmode=require");
        assert!(error.contains("use verify-full"), "{error}");
    }

    #[test]
    fn a_roots_file_that_cannot_be_read_is_refused_by_name() {
        let error =
            invalid("postgres://u:hunter2@db/app?sslmode=verify-ca&sslrootcert=/no/such/ca.pem");
        assert!(
            error.contains("sslrootcert `/no/such/ca.pem` cannot be read"),
            "{error}"
        );
        assert!(!error.contains("hunter2"));
    }

    #[test]
    fn a_socket_only_target_does_not_ask_for_tls() {
        let target = parsed("host=/run/postgresql sslmode=require");
        assert_eq!(target.config.get_ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn the_target_shows_the_server_never_the_password() {
        for (url, shown) in [
            (
                "postgres://sender:hunter2@127.0.0.1:5544/billing",
                "postgres://sender@127.0.0.1:5544/billing",
            ),
            (
                "postgres://sender:hun%23ter%2F2%3F@db/app?sslmode=disable",
                "postgres://sender@db:5432/app",
            ),
            (
                "postgres://sender:hun#ter/2?@db/app",
                "postgres://sender@db:5432/app",
            ),
            (
                "host=a,b port=1,2 user=u password='hunter2' dbname=d",
                "postgres://u@a:1,b:2/d",
            ),
            ("postgres://u@[::1]:7/d", "postgres://u@[::1]:7/d"),
            ("hostaddr=127.0.0.1 user=u", "postgres://u@127.0.0.1:5432/u"),
        ] {
            let target = parsed(url);
            assert_eq!(target.to_string(), shown);
            assert!(!format!("{target:?}").contains("hun"));
        }
    }

    #[test]
    fn no_error_quotes_the_password() {
        for url in [
            "postgres://u:hunter2@ss@db/app",
            "postgres://u:hunter2@db/app?port=x",
            "postgres://u:hunter2@db/app?sslmode=verify-full&sslrootcert=/no/such.pem",
            "host=db password='hunter2",
        ] {
            let error = invalid(url);
            assert!(
                !error.contains("hunter2") && !error.contains("ss@"),
                "{error}"
            );
        }
    }
}
