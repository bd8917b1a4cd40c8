//! The gateway's settings: where its data and sockets live, which providers it runs, and its
//! policy.
//!
//! [`Config::load`] reads, in this order:
//! 1. the file named by its argument, else the one `KEYHOLE_CONFIG` names, else
//!    `<config dir>/keyhole/keyhole.toml` (`$XDG_CONFIG_HOME`, else `$HOME/.config`) if it
//!    exists, else nothing: every key is optional and the defaults are hardened;
//! 2. the `KEYHOLE_*` environment overrides ([`ENV_OVERRIDES`]), which win over the file;
//! 3. validation. Every problem is fatal and its error names the key or variable to fix.
//!
//! ```toml
//! data_dir = "/home/u/.local/share/keyhole"   # default: $XDG_DATA_HOME/keyhole, else $HOME/.local/share/keyhole
//! runtime_dir = "/run/user/1000/keyhole"      # default: $XDG_RUNTIME_DIR/keyhole, else /tmp/keyhole-<euid>
//! state_db = "/home/u/.local/share/keyhole/state.db"   # default: <data_dir>/state.db
//! default_provider = "file"
//! call_timeout_ms = 5000                      # 1..=600000
//! handshake_timeout_ms = 5000                 # 1..=600000
//!
//! [providers.file]                            # without a [providers] table, exactly this one exists
//! kind = "spawn"
//! command = "keyhole-provider-file"           # a bare name: beside the keyhole binary, then PATH
//! args = ["--store", "{data_dir}/file-store", "--key-file", "{data_dir}/kek"]
//! env = { KEYHOLE_LOG = "info" }
//!
//! [providers.sidecar]
//! kind = "connect"
//! socket = "/run/keyhole/env.sock"
//! token_file = "/run/keyhole/env.token"
//! uid = 1000                                  # default: the gateway's euid
//!
//! [[policy]]                                  # without any, the owner may do everything
//! effect = "allow"
//! callers = ["owner"]
//! operations = ["*"]
//! scopes = ["*"]
//! labels = { team = "infra" }
//! ```
//!
//! `{data_dir}` and `{runtime_dir}` are replaced by the final directories in a provider's
//! `command`, `args`, `env` values, `socket` and `token_file`. Paths must be absolute (`~` is not
//! expanded); the one exception is a spawn provider's bare command name. The policy's meaning is
//! in [`crate::policy`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::{Policy, PolicyError, Rule};

/// The config file's name, in `<config dir>/keyhole/`.
pub const CONFIG_FILE_NAME: &str = "keyhole.toml";

/// The provider that exists when the file has no `[providers]` table, and the default
/// `default_provider`.
pub const EMBEDDED_PROVIDER: &str = "file";

/// The embedded provider's command.
pub const EMBEDDED_PROVIDER_COMMAND: &str = "keyhole-provider-file";

/// The name of the keychain provider the embedded defaults pick when a Secret Service answers.
pub const EMBEDDED_KEYCHAIN: &str = "keychain";

/// The keychain provider's command.
pub const EMBEDDED_KEYCHAIN_COMMAND: &str = "keyhole-provider-keychain";

/// The default of both timeouts, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;

/// The largest timeout accepted, in milliseconds (10 minutes).
pub const MAX_TIMEOUT_MS: u64 = 600_000;

/// The longest provider name.
pub const MAX_PROVIDER_NAME_LEN: usize = 32;

/// Names the config file to read.
pub const ENV_CONFIG: &str = "KEYHOLE_CONFIG";
/// Overrides `data_dir`.
pub const ENV_DATA_DIR: &str = "KEYHOLE_DATA_DIR";
/// Overrides `runtime_dir`.
pub const ENV_RUNTIME_DIR: &str = "KEYHOLE_RUNTIME_DIR";
/// Overrides `state_db`.
pub const ENV_STATE_DB: &str = "KEYHOLE_STATE_DB";
/// Overrides `default_provider`.
pub const ENV_DEFAULT_PROVIDER: &str = "KEYHOLE_DEFAULT_PROVIDER";
/// Overrides `call_timeout_ms`.
pub const ENV_CALL_TIMEOUT_MS: &str = "KEYHOLE_CALL_TIMEOUT_MS";
/// Overrides `handshake_timeout_ms`.
pub const ENV_HANDSHAKE_TIMEOUT_MS: &str = "KEYHOLE_HANDSHAKE_TIMEOUT_MS";

/// Every environment variable that configures the gateway.
pub const ENV_OVERRIDES: [&str; 7] = [
    ENV_CONFIG,
    ENV_DATA_DIR,
    ENV_RUNTIME_DIR,
    ENV_STATE_DB,
    ENV_DEFAULT_PROVIDER,
    ENV_CALL_TIMEOUT_MS,
    ENV_HANDSHAKE_TIMEOUT_MS,
];

/// Why the settings could not be loaded. Each message names the file, key or variable to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read the config file {} ({origin}): {source} — {fix}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Who named it: given explicitly, `KEYHOLE_CONFIG`, or the default location.
        origin: &'static str,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
        /// What to do about it.
        fix: &'static str,
    },
    /// The file is not valid TOML, or a value has the wrong type.
    #[error("{}: {}{message} — fix the file and try again", path.display(), at(.line, .column))]
    Parse {
        /// The file.
        path: PathBuf,
        /// The 1-based line of the problem, when known.
        line: Option<usize>,
        /// The 1-based column of the problem, when known.
        column: Option<usize>,
        /// What the TOML parser said.
        message: String,
    },
    /// The file has a key keyhole does not know.
    #[error(
        "{}: {}unknown key \"{key}\" — remove it or correct its spelling ({expected})",
        path.display(), at(.line, &None)
    )]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The 1-based line of the key, when known.
        line: Option<usize>,
        /// The key.
        key: String,
        /// The keys allowed there.
        expected: String,
    },
    /// A required setting has no value.
    #[error("required setting \"{setting}\" is missing — {fix}")]
    Missing {
        /// The setting, such as `providers.vault.command`.
        setting: String,
        /// What to do about it.
        fix: String,
    },
    /// A setting has a value that is not acceptable.
    #[error("setting \"{setting}\" {problem} — {fix}")]
    Invalid {
        /// The setting, such as `call_timeout_ms` or `providers.vault.socket`.
        setting: String,
        /// What is wrong with it.
        problem: String,
        /// What to do about it.
        fix: String,
    },
    /// A policy rule has a value that is not acceptable.
    #[error("setting \"{setting}\": {source}")]
    Policy {
        /// The setting, such as `policy[0].operations`.
        setting: String,
        /// What is wrong, and what to write instead.
        #[source]
        source: PolicyError,
    },
    /// A `KEYHOLE_*` environment override is malformed or not acceptable.
    #[error("environment variable {var} {problem} — {fix}")]
    Env {
        /// The variable, such as `KEYHOLE_CALL_TIMEOUT_MS`.
        var: String,
        /// What is wrong with it.
        problem: String,
        /// What to do about it.
        fix: String,
    },
}

impl ConfigError {
    /// The setting, key or environment variable the error is about, if it is about one.
    pub fn setting(&self) -> Option<&str> {
        match self {
            ConfigError::Missing { setting, .. }
            | ConfigError::Invalid { setting, .. }
            | ConfigError::Policy { setting, .. } => Some(setting),
            ConfigError::UnknownKey { key, .. } => Some(key),
            ConfigError::Env { var, .. } => Some(var),
            ConfigError::Read { .. } | ConfigError::Parse { .. } => None,
        }
    }

    /// The 1-based line in the config file the error is about, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Parse { line, .. } | ConfigError::UnknownKey { line, .. } => *line,
            _ => None,
        }
    }
}

/// `line 3, column 7: ` (or less, as far as known).
fn at(line: &Option<usize>, column: &Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!("line {line}, column {column}: "),
        (Some(line), None) => format!("line {line}: "),
        _ => String::new(),
    }
}

/// How the gateway reaches one provider.
#[derive(Clone, PartialEq, Eq)]
pub enum ProviderConfig {
    /// The gateway starts it and it dials back.
    Spawn {
        /// The executable: an absolute path, or a bare name found neither beside the keyhole
        /// binary nor on `PATH` (starting it then fails and names it).
        command: PathBuf,
        /// Its arguments, with `{data_dir}` and `{runtime_dir}` replaced.
        args: Vec<String>,
        /// Extra environment, with `{data_dir}` and `{runtime_dir}` replaced in the values.
        env: BTreeMap<String, String>,
    },
    /// It is already listening (a sidecar); the gateway dials it.
    Connect {
        /// Its socket.
        socket: PathBuf,
        /// The file holding the token it expects.
        token_file: PathBuf,
        /// The uid it must run as; `None` means the gateway's own euid.
        uid: Option<u32>,
    },
}

impl std::fmt::Debug for ProviderConfig {
    /// Shows the names of `env` entries but not their values, which may hold credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProviderConfig::Spawn { command, args, env } => f
                .debug_struct("Spawn")
                .field("command", command)
                .field("args", args)
                .field("env", &env.keys().collect::<Vec<_>>())
                .finish(),
            ProviderConfig::Connect {
                socket,
                token_file,
                uid,
            } => f
                .debug_struct("Connect")
                .field("socket", socket)
                .field("token_file", token_file)
                .field("uid", uid)
                .finish(),
        }
    }
}

/// The gateway's settings, loaded and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where the gateway keeps its data (the state database, the file provider's store).
    pub data_dir: PathBuf,
    /// Where the gateway puts its sockets and tokens.
    pub runtime_dir: PathBuf,
    /// The state database (handles and the audit log).
    pub state_db: PathBuf,
    /// The provider `put` uses when none is named; always one of `providers`.
    pub default_provider: String,
    /// The deadline of each provider call.
    pub call_timeout: Duration,
    /// The deadline of a provider's start-up plus handshake.
    pub handshake_timeout: Duration,
    /// The providers, by name.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Who may do what.
    pub policy: Policy,
    /// The file the settings came from, if any.
    pub source: Option<PathBuf>,
    /// Whether `providers` is the embedded default set.
    embedded_providers: bool,
    /// Set when the embedded defaults are in use and nothing named a default provider: then
    /// `keyhole serve` picks one at start-up ([`crate::defaults`]). Holds the keychain provider
    /// to probe, or why there is none to probe.
    pub auto_default: Option<Result<ProviderConfig, String>>,
}

impl Config {
    /// Loads: the file named by `path`, else `$KEYHOLE_CONFIG`, else
    /// `<config dir>/keyhole/keyhole.toml` (`$XDG_CONFIG_HOME` or `$HOME/.config`) if it exists,
    /// else embedded defaults; then `KEYHOLE_*` environment overrides; then validation.
    ///
    /// Bare provider commands are looked up beside the running executable first. Environment
    /// variables that are not valid UTF-8 count as unset, except `KEYHOLE_*` ones, which are
    /// refused.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut env = BTreeMap::new();
        for (key, value) in std::env::vars_os() {
            let Ok(key) = key.into_string() else { continue };
            match value.into_string() {
                Ok(value) => {
                    env.insert(key, value);
                }
                Err(_) if key.starts_with("KEYHOLE_") => {
                    return Err(ConfigError::Env {
                        var: key,
                        problem: "is not valid UTF-8".into(),
                        fix: "set it to a UTF-8 value or unset it".into(),
                    });
                }
                Err(_) => {}
            }
        }
        let exe = std::env::current_exe().ok();
        let exe_dir = exe.as_deref().and_then(Path::parent);
        Config::load_with_env(path, &env, exe_dir)
    }

    /// Same as [`Config::load`], with an explicit environment instead of the process's, and the
    /// directory to look for bare provider commands in before `PATH` (normally the keyhole
    /// binary's).
    pub fn load_with_env(
        path: Option<&Path>,
        env: &BTreeMap<String, String>,
        exe_dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let env = Env(env);
        let (raw, source) = match config_file(path, &env)? {
            Some(file) => {
                let text =
                    std::fs::read_to_string(&file.path).map_err(|source| ConfigError::Read {
                        path: file.path.clone(),
                        origin: file.origin,
                        source,
                        fix: file.fix,
                    })?;
                tracing::debug!(path = %file.path.display(), "reading the config file");
                (parse(&text, &file.path)?, Some(file.path))
            }
            None => (RawConfig::default(), None),
        };
        let file_hint = source
            .as_ref()
            .map_or_else(|| CONFIG_FILE_NAME.to_owned(), |p| p.display().to_string());

        let data_dir = match env.path(ENV_DATA_DIR)? {
            Some(dir) => dir,
            None => match &raw.data_dir {
                Some(dir) => file_path("data_dir", dir, &file_hint)?,
                None => default_data_dir(&env, &file_hint)?,
            },
        };
        let runtime_dir = match env.path(ENV_RUNTIME_DIR)? {
            Some(dir) => dir,
            None => match &raw.runtime_dir {
                Some(dir) => file_path("runtime_dir", dir, &file_hint)?,
                None => default_runtime_dir(&env),
            },
        };
        let state_db = match env.path(ENV_STATE_DB)? {
            Some(db) => db,
            None => match &raw.state_db {
                Some(db) => file_path("state_db", db, &file_hint)?,
                None => data_dir.join("state.db"),
            },
        };
        let call_timeout = timeout(
            &env,
            ENV_CALL_TIMEOUT_MS,
            "call_timeout_ms",
            raw.call_timeout_ms,
            &file_hint,
        )?;
        let handshake_timeout = timeout(
            &env,
            ENV_HANDSHAKE_TIMEOUT_MS,
            "handshake_timeout_ms",
            raw.handshake_timeout_ms,
            &file_hint,
        )?;

        let ctx = Context {
            data_dir: data_dir.to_string_lossy().into_owned(),
            runtime_dir: runtime_dir.to_string_lossy().into_owned(),
            file_hint: &file_hint,
            exe_dir,
            path_var: env.get("PATH"),
        };
        let embedded_providers = raw.providers.is_none();
        let mut providers = BTreeMap::new();
        for (name, raw_provider) in raw.providers.unwrap_or_else(embedded_provider_set) {
            let provider = provider_config(&name, raw_provider, &ctx)?;
            providers.insert(name, provider);
        }

        let chosen = raw.default_provider.is_some() || env.get(ENV_DEFAULT_PROVIDER).is_some();
        let auto_default = (embedded_providers && !chosen).then(|| {
            let keychain = RawProvider {
                kind: Some("spawn".into()),
                command: Some(EMBEDDED_KEYCHAIN_COMMAND.into()),
                args: Some(vec!["--store".into(), "secret-service".into()]),
                ..RawProvider::default()
            };
            provider_config(EMBEDDED_KEYCHAIN, keychain, &ctx).map_err(|_| {
                format!("{EMBEDDED_KEYCHAIN_COMMAND} is not installed beside keyhole or on PATH")
            })
        });
        let default_provider = default_provider(&env, raw.default_provider, &providers, &ctx)?;

        let policy = match raw.policy {
            None => Policy::owner_only(),
            Some(rules) => Policy::new(
                rules
                    .into_iter()
                    .enumerate()
                    .map(|(i, rule)| policy_rule(i, rule, &ctx))
                    .collect::<Result<_, _>>()?,
            ),
        };

        Ok(Config {
            data_dir,
            runtime_dir,
            state_db,
            default_provider,
            call_timeout,
            handshake_timeout,
            providers,
            policy,
            source,
            embedded_providers,
            auto_default,
        })
    }

    /// Whether the embedded default provider set is in use (the file has no `[providers]`
    /// table).
    pub fn uses_embedded_providers(&self) -> bool {
        self.embedded_providers
    }
}

/// The file's top level, as written. Values are checked after the environment overrides, so
/// that each error can name its key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<String>,
    runtime_dir: Option<String>,
    state_db: Option<String>,
    default_provider: Option<String>,
    call_timeout_ms: Option<i64>,
    handshake_timeout_ms: Option<i64>,
    providers: Option<BTreeMap<String, RawProvider>>,
    policy: Option<Vec<RawRule>>,
}

/// A `[providers.<name>]` table, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kind: Option<String>,
    command: Option<String>,
    args: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    socket: Option<String>,
    token_file: Option<String>,
    uid: Option<i64>,
}

/// A `[[policy]]` entry, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    effect: Option<String>,
    callers: Option<Vec<String>>,
    operations: Option<Vec<String>>,
    scopes: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
}

/// The provider set used when the file has no `[providers]` table.
fn embedded_provider_set() -> BTreeMap<String, RawProvider> {
    let args = [
        "--store",
        "{data_dir}/file-store",
        "--key-file",
        "{data_dir}/kek",
    ];
    BTreeMap::from([(
        EMBEDDED_PROVIDER.to_owned(),
        RawProvider {
            kind: Some("spawn".into()),
            command: Some(EMBEDDED_PROVIDER_COMMAND.into()),
            args: Some(args.iter().map(|a| (*a).to_owned()).collect()),
            ..RawProvider::default()
        },
    )])
}

/// The environment the settings are loaded with. Empty values of the XDG variables, `HOME` and
/// `PATH` count as unset.
struct Env<'a>(&'a BTreeMap<String, String>);

impl<'a> Env<'a> {
    /// A variable's value, `None` when unset or empty.
    fn get(&self, name: &str) -> Option<&'a str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A base directory from `name` (an XDG variable or `HOME`): ignored unless absolute, as the
    /// XDG base directory specification says.
    fn base_dir(&self, name: &str) -> Option<PathBuf> {
        self.get(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    }

    /// A `KEYHOLE_*` override that is set: an error when it is empty.
    fn set(&self, var: &str, what: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.0.get(var) {
            None => Ok(None),
            Some(value) if value.trim().is_empty() => Err(ConfigError::Env {
                var: var.into(),
                problem: "is empty".into(),
                fix: format!("set it to {what} or unset it"),
            }),
            Some(value) => Ok(Some(value)),
        }
    }

    /// A `KEYHOLE_*` path override: absolute.
    fn path(&self, var: &str) -> Result<Option<PathBuf>, ConfigError> {
        let Some(value) = self.set(var, "an absolute path")? else {
            return Ok(None);
        };
        let path = PathBuf::from(value);
        if path.is_absolute() {
            Ok(Some(path))
        } else {
            Err(ConfigError::Env {
                var: var.into(),
                problem: format!("is the relative path {value:?}"),
                fix: format!(
                    "set it to an absolute path{} or unset it",
                    tilde_hint(value)
                ),
            })
        }
    }
}

/// Which file to read, and how to talk about it.
struct ConfigFile {
    path: PathBuf,
    origin: &'static str,
    fix: &'static str,
}

/// The config file to read, if any.
fn config_file(path: Option<&Path>, env: &Env<'_>) -> Result<Option<ConfigFile>, ConfigError> {
    if let Some(path) = path {
        return Ok(Some(ConfigFile {
            path: path.to_owned(),
            origin: "given explicitly",
            fix: "check the path and the file's permissions",
        }));
    }
    if let Some(path) = env.set(ENV_CONFIG, "the path of a config file")? {
        return Ok(Some(ConfigFile {
            path: PathBuf::from(path),
            origin: "named by KEYHOLE_CONFIG",
            fix: "check the path, or unset KEYHOLE_CONFIG to use the default location",
        }));
    }
    let config_home = env
        .base_dir("XDG_CONFIG_HOME")
        .or_else(|| env.base_dir("HOME").map(|home| home.join(".config")));
    let Some(config_home) = config_home else {
        return Ok(None);
    };
    let path = config_home.join("keyhole").join(CONFIG_FILE_NAME);
    let origin = "the default location";
    let fix = "fix its permissions, or move it away to use the built-in defaults";
    match path.try_exists() {
        Ok(true) => Ok(Some(ConfigFile { path, origin, fix })),
        Ok(false) => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path,
            origin,
            source,
            fix,
        }),
    }
}

/// Parses the file's text, turning the parser's byte offsets into lines and columns.
fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = match e.span() {
            Some(span) => {
                let (line, column) = line_col(text, span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        // The parser's messages may span lines ("invalid string\nexpected ..."): keep one.
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let message = without_values(&message);
        // serde's wording: "unknown field `name`, expected one of `a`, `b`".
        if let Some(rest) = message.strip_prefix("unknown field `")
            && let Some((key, expected)) = rest.split_once('`')
        {
            return ConfigError::UnknownKey {
                path: path.to_owned(),
                line,
                key: key.to_owned(),
                expected: expected.trim_start_matches([',', ' ']).to_owned(),
            };
        }
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message,
        }
    })
}

/// The parser's `message` with the values it quotes replaced by `…`, since a config file's values
/// may be credentials (a provider's `env`). serde quotes the value it found: as a debug-escaped
/// string (`invalid type: string "…", expected a map`), or in backticks after `invalid type:`,
/// `invalid value:` or `unknown variant` (`integer `5``). Other backticked text names keys or
/// expected tokens and stays.
fn without_values(message: &str) -> String {
    let quotes_a_value = ["invalid type: ", "invalid value: ", "unknown variant "]
        .iter()
        .any(|p| message.starts_with(p));
    let mut value_ticks_left = quotes_a_value;
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push_str("\"…\"");
                let mut escaped = false;
                for c in chars.by_ref() {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => break,
                        (false, _) => {}
                    }
                }
            }
            '`' if value_ticks_left => {
                value_ticks_left = false;
                out.push_str("`…`");
                chars.by_ref().find(|&c| c == '`');
            }
            '`' => {
                out.push('`');
                for c in chars.by_ref() {
                    out.push(c);
                    if c == '`' {
                        break;
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = text.get(..end).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).unwrap_or_default().chars().count() + 1;
    (line, column)
}

/// A hint for a path written with `~`.
fn tilde_hint(value: &str) -> &'static str {
    if value.starts_with('~') {
        " (~ is not expanded: write the full path)"
    } else {
        ""
    }
}

/// A path from the file: non-empty and absolute.
fn file_path(setting: &str, value: &str, file_hint: &str) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(value);
    if value.trim().is_empty() {
        return Err(ConfigError::Invalid {
            setting: setting.into(),
            problem: "is empty".into(),
            fix: format!("set it to an absolute path in {file_hint}, or remove it for the default"),
        });
    }
    if !path.is_absolute() {
        return Err(ConfigError::Invalid {
            setting: setting.into(),
            problem: format!("is the relative path {value:?}"),
            fix: format!("use an absolute path in {file_hint}{}", tilde_hint(value)),
        });
    }
    Ok(path)
}

/// `$XDG_DATA_HOME/keyhole`, else `$HOME/.local/share/keyhole`.
fn default_data_dir(env: &Env<'_>, file_hint: &str) -> Result<PathBuf, ConfigError> {
    env.base_dir("XDG_DATA_HOME")
        .map(|dir| dir.join("keyhole"))
        .or_else(|| {
            env.base_dir("HOME")
                .map(|home| home.join(".local").join("share").join("keyhole"))
        })
        .ok_or_else(|| ConfigError::Missing {
            setting: "data_dir".into(),
            fix: format!(
                "neither XDG_DATA_HOME nor HOME is set to an absolute path, so it has no default: \
                 set data_dir in {file_hint} or via the {ENV_DATA_DIR} environment variable"
            ),
        })
}

/// `$XDG_RUNTIME_DIR/keyhole`, else `/tmp/keyhole-<euid>`.
fn default_runtime_dir(env: &Env<'_>) -> PathBuf {
    match env.base_dir("XDG_RUNTIME_DIR") {
        Some(dir) => dir.join("keyhole"),
        None => fallback_runtime_dir(),
    }
}

#[cfg(unix)]
fn fallback_runtime_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/keyhole-{}", nix::unistd::geteuid().as_raw()))
}

#[cfg(not(unix))]
fn fallback_runtime_dir() -> PathBuf {
    std::env::temp_dir().join("keyhole")
}

/// A timeout: the override, else the file's value, else the default; within 1..=600000 ms.
fn timeout(
    env: &Env<'_>,
    var: &str,
    setting: &str,
    from_file: Option<i64>,
    file_hint: &str,
) -> Result<Duration, ConfigError> {
    let range = format!("1..={MAX_TIMEOUT_MS}");
    if let Some(value) = env.set(var, &format!("a number of milliseconds in {range}"))? {
        let ms = value
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms));
        return ms
            .map(Duration::from_millis)
            .ok_or_else(|| ConfigError::Env {
                var: var.into(),
                problem: format!("is {value:?}, not a number of milliseconds in {range}"),
                fix: format!("set it to a whole number in {range} or unset it"),
            });
    }
    match from_file {
        None => Ok(Duration::from_millis(DEFAULT_TIMEOUT_MS)),
        Some(ms) => u64::try_from(ms)
            .ok()
            .filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms))
            .map(Duration::from_millis)
            .ok_or_else(|| ConfigError::Invalid {
                setting: setting.into(),
                problem: format!("is {ms}, outside {range} milliseconds"),
                fix: format!(
                    "set it to a number of milliseconds in {range} in {file_hint} or via {var}"
                ),
            }),
    }
}

/// What resolving a provider table needs.
struct Context<'a> {
    data_dir: String,
    runtime_dir: String,
    file_hint: &'a str,
    exe_dir: Option<&'a Path>,
    path_var: Option<&'a str>,
}

impl Context<'_> {
    /// `value` with `{data_dir}` and `{runtime_dir}` replaced (in one pass, so a directory
    /// containing a placeholder is not replaced again). Other braces are kept as they are.
    fn substitute(&self, value: &str) -> String {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(i) = rest.find('{') {
            let (head, tail) = rest.split_at(i);
            out.push_str(head);
            if let Some(after) = tail.strip_prefix("{data_dir}") {
                out.push_str(&self.data_dir);
                rest = after;
            } else if let Some(after) = tail.strip_prefix("{runtime_dir}") {
                out.push_str(&self.runtime_dir);
                rest = after;
            } else {
                out.push('{');
                rest = tail.get(1..).unwrap_or_default();
            }
        }
        out.push_str(rest);
        out
    }
}

/// Whether `name` is a valid provider name: `[a-z0-9_-]{1,32}`.
fn is_valid_provider_name(name: &str) -> bool {
    (1..=MAX_PROVIDER_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// One provider table, checked and resolved.
fn provider_config(
    name: &str,
    raw: RawProvider,
    ctx: &Context<'_>,
) -> Result<ProviderConfig, ConfigError> {
    if !is_valid_provider_name(name) {
        return Err(ConfigError::Invalid {
            setting: format!("providers.{name}"),
            problem: format!("has the name {name:?}, which is not allowed"),
            fix: format!(
                "rename it in {} to 1 to {MAX_PROVIDER_NAME_LEN} characters of a-z, 0-9, _ and -",
                ctx.file_hint
            ),
        });
    }
    let key = |field: &str| format!("providers.{name}.{field}");
    let Some(kind) = raw.kind.as_deref() else {
        return Err(ConfigError::Missing {
            setting: key("kind"),
            fix: format!(
                "set it to \"spawn\" (the gateway starts the provider) or \"connect\" (it is \
                 already listening) in {}",
                ctx.file_hint
            ),
        });
    };
    let not_for = |kind: &str, present: &[(&str, bool)]| -> Result<(), ConfigError> {
        match present.iter().find(|(_, is_set)| *is_set) {
            Some((field, _)) => Err(ConfigError::Invalid {
                setting: key(field),
                problem: format!("is not a setting of a {kind} provider"),
                fix: format!(
                    "remove it from {}, or change providers.{name}.kind",
                    ctx.file_hint
                ),
            }),
            None => Ok(()),
        }
    };
    let no_nul = |field: String, value: &str| -> Result<(), ConfigError> {
        if value.contains('\0') {
            Err(ConfigError::Invalid {
                setting: field,
                problem: "contains a NUL character".into(),
                fix: format!("remove it in {}", ctx.file_hint),
            })
        } else {
            Ok(())
        }
    };
    match kind {
        "spawn" => {
            not_for(
                "spawn",
                &[
                    ("socket", raw.socket.is_some()),
                    ("token_file", raw.token_file.is_some()),
                    ("uid", raw.uid.is_some()),
                ],
            )?;
            let Some(command) = raw.command.as_deref() else {
                return Err(ConfigError::Missing {
                    setting: key("command"),
                    fix: format!(
                        "set it in {} to the provider's executable: an absolute path, or a bare \
                         name found beside keyhole or on PATH",
                        ctx.file_hint
                    ),
                });
            };
            let command = ctx.substitute(command);
            no_nul(key("command"), &command)?;
            let command = resolve_command(&key("command"), &command, ctx)?;
            let args = raw.args.unwrap_or_default();
            let args: Vec<String> = args.iter().map(|a| ctx.substitute(a)).collect();
            for (i, arg) in args.iter().enumerate() {
                no_nul(format!("{}[{i}]", key("args")), arg)?;
            }
            let mut env = BTreeMap::new();
            for (var, value) in raw.env.unwrap_or_default() {
                if var.is_empty() || var.contains(['=', '\0']) {
                    return Err(ConfigError::Invalid {
                        setting: key("env"),
                        problem: format!("has the variable name {var:?}"),
                        fix: format!("use a non-empty name without '=' in {}", ctx.file_hint),
                    });
                }
                let value = ctx.substitute(&value);
                no_nul(format!("{}.{var}", key("env")), &value)?;
                env.insert(var, value);
            }
            Ok(ProviderConfig::Spawn { command, args, env })
        }
        "connect" => {
            not_for(
                "connect",
                &[
                    ("command", raw.command.is_some()),
                    ("args", raw.args.is_some()),
                    ("env", raw.env.is_some()),
                ],
            )?;
            let required = |field: &str, value: Option<String>, what: &str| {
                let Some(value) = value else {
                    return Err(ConfigError::Missing {
                        setting: key(field),
                        fix: format!("set it in {} to the absolute path of {what}", ctx.file_hint),
                    });
                };
                let value = ctx.substitute(&value);
                no_nul(key(field), &value)?;
                file_path(&key(field), &value, ctx.file_hint)
            };
            let socket = required("socket", raw.socket, "the provider's socket")?;
            let token_file = required("token_file", raw.token_file, "the provider's token file")?;
            let uid = match raw.uid {
                None => None,
                Some(uid) => Some(u32::try_from(uid).map_err(|_| ConfigError::Invalid {
                    setting: key("uid"),
                    problem: format!("is {uid}, which is not a uid"),
                    fix: format!(
                        "set it to the provider's uid (0..={}) in {}, or remove it to require \
                         the gateway's own",
                        u32::MAX,
                        ctx.file_hint
                    ),
                })?),
            };
            Ok(ProviderConfig::Connect {
                socket,
                token_file,
                uid,
            })
        }
        other => Err(ConfigError::Invalid {
            setting: key("kind"),
            problem: format!("is {other:?}"),
            fix: format!("use \"spawn\" or \"connect\" in {}", ctx.file_hint),
        }),
    }
}

/// A spawn provider's command: an absolute path as it is; a bare name beside the keyhole
/// binary, else in an absolute `PATH` entry, else kept bare (starting it then fails, naming it).
fn resolve_command(
    setting: &str,
    command: &str,
    ctx: &Context<'_>,
) -> Result<PathBuf, ConfigError> {
    if command.trim().is_empty() {
        return Err(ConfigError::Invalid {
            setting: setting.into(),
            problem: "is empty".into(),
            fix: format!("set it to the provider's executable in {}", ctx.file_hint),
        });
    }
    let path = Path::new(command);
    let is_bare = path.components().count() == 1 && !path.has_root() && !command.contains('/');
    if !is_bare {
        if path.is_absolute() {
            return Ok(path.to_owned());
        }
        return Err(ConfigError::Invalid {
            setting: setting.into(),
            problem: format!("is the relative path {command:?}"),
            fix: format!(
                "use an absolute path{}, or a bare name found beside keyhole or on PATH, in {}",
                tilde_hint(command),
                ctx.file_hint
            ),
        });
    }
    let mut dirs: Vec<PathBuf> = ctx.exe_dir.map(Path::to_owned).into_iter().collect();
    if let Some(path_var) = ctx.path_var {
        // Relative PATH entries (such as ".") would make the provider depend on the working
        // directory; they are skipped.
        dirs.extend(std::env::split_paths(path_var).filter(|d| d.is_absolute()));
    }
    let suffix = std::env::consts::EXE_SUFFIX;
    let mut names = vec![command.to_owned()];
    if !suffix.is_empty() && !command.ends_with(suffix) {
        names.push(format!("{command}{suffix}"));
    }
    for dir in &dirs {
        for name in &names {
            let candidate = dir.join(name);
            if is_executable_file(&candidate) {
                return Ok(candidate);
            }
        }
    }
    tracing::debug!(
        command,
        "provider command found neither beside keyhole nor on PATH"
    );
    Ok(PathBuf::from(command))
}

/// Whether `path` is a regular file (following links) the gateway could execute.
fn is_executable_file(path: &Path) -> bool {
    let Ok(meta) = path.metadata() else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}

/// The default provider: the override, else the file's, else the embedded one; it must be
/// configured.
fn default_provider(
    env: &Env<'_>,
    from_file: Option<String>,
    providers: &BTreeMap<String, ProviderConfig>,
    ctx: &Context<'_>,
) -> Result<String, ConfigError> {
    let configured = if providers.is_empty() {
        "none is configured".to_owned()
    } else {
        let names: Vec<&str> = providers.keys().map(String::as_str).collect();
        format!("configured: {}", names.join(", "))
    };
    if let Some(name) = env.set(ENV_DEFAULT_PROVIDER, "the name of a configured provider")? {
        if providers.contains_key(name) {
            return Ok(name.to_owned());
        }
        return Err(ConfigError::Env {
            var: ENV_DEFAULT_PROVIDER.into(),
            problem: format!("names {name:?}, which is not a configured provider ({configured})"),
            fix: "set it to a configured provider or unset it".into(),
        });
    }
    let was_set = from_file.is_some();
    let name = from_file.unwrap_or_else(|| EMBEDDED_PROVIDER.to_owned());
    if providers.contains_key(&name) {
        return Ok(name);
    }
    Err(ConfigError::Invalid {
        setting: "default_provider".into(),
        problem: format!("is {name:?}, which is not a configured provider ({configured})"),
        fix: if providers.is_empty() {
            format!(
                "add a [providers.<name>] table to {}, or remove the empty [providers] table to \
                 use the built-in file provider",
                ctx.file_hint
            )
        } else if was_set {
            format!(
                "add [providers.{name}] to {} or set default_provider to a configured provider",
                ctx.file_hint
            )
        } else {
            format!(
                "set default_provider in {} or via {ENV_DEFAULT_PROVIDER} to a configured provider",
                ctx.file_hint
            )
        },
    })
}

/// One `[[policy]]` entry, checked.
fn policy_rule(index: usize, raw: RawRule, ctx: &Context<'_>) -> Result<Rule, ConfigError> {
    let key = |field: &str| format!("policy[{index}].{field}");
    let effect = match raw.effect {
        None => {
            return Err(ConfigError::Missing {
                setting: key("effect"),
                fix: format!("set it to \"allow\" or \"deny\" in {}", ctx.file_hint),
            });
        }
        Some(effect) => effect.parse().map_err(|source| ConfigError::Policy {
            setting: key("effect"),
            source,
        })?,
    };
    let callers = patterns(
        &key("callers"),
        raw.callers,
        ctx,
        "callers such as \"owner\", \"uid:1000\" or \"*\"",
    )?;
    let operations = patterns(
        &key("operations"),
        raw.operations,
        ctx,
        "operations such as \"resolve\" or \"*\"",
    )?;
    let scopes = patterns(
        &key("scopes"),
        raw.scopes,
        ctx,
        "scopes such as \"ci/*\" or \"*\"",
    )?;
    Ok(Rule::new(
        effect,
        callers,
        operations,
        scopes,
        raw.labels.unwrap_or_default(),
    ))
}

/// A rule's required, non-empty list of patterns, each parsed.
fn patterns<T: std::str::FromStr<Err = PolicyError>>(
    setting: &str,
    values: Option<Vec<String>>,
    ctx: &Context<'_>,
    example: &str,
) -> Result<Vec<T>, ConfigError> {
    let Some(values) = values else {
        return Err(ConfigError::Missing {
            setting: setting.into(),
            fix: format!("list the {example} in {}", ctx.file_hint),
        });
    };
    if values.is_empty() {
        return Err(ConfigError::Invalid {
            setting: setting.into(),
            problem: "is empty, so the rule would match nothing".into(),
            fix: format!("list {example} in {}, or remove the rule", ctx.file_hint),
        });
    }
    values
        .iter()
        .map(|v| {
            v.parse().map_err(|source| ConfigError::Policy {
                setting: setting.into(),
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_messages_lose_the_values_they_quote_and_keep_the_rest() {
        let cases = [
            (
                r#"invalid type: string "a\", expected b", expected a map"#,
                r#"invalid type: string "…", expected a map"#,
            ),
            (
                "invalid type: integer `424242`, expected a string",
                "invalid type: integer `…`, expected a string",
            ),
            (
                "unknown variant `allw`, expected `allow` or `deny`",
                "unknown variant `…`, expected `allow` or `deny`",
            ),
            (
                r#"invalid string; expected `"`, `'`"#,
                r#"invalid string; expected `"`, `'`"#,
            ),
            ("duplicate key `env`", "duplicate key `env`"),
            (r#"unterminated "abc"#, r#"unterminated "…""#),
        ];
        for (message, scrubbed) in cases {
            assert_eq!(without_values(message), scrubbed, "{message}");
        }
    }

    fn ctx<'a>(exe_dir: Option<&'a Path>, path_var: Option<&'a str>) -> Context<'a> {
        Context {
            data_dir: "/d".into(),
            runtime_dir: "/r".into(),
            file_hint: "keyhole.toml",
            exe_dir,
            path_var,
        }
    }

    #[test]
    fn substitution_replaces_both_placeholders_once() {
        let c = ctx(None, None);
        assert_eq!(c.substitute("{data_dir}/kek"), "/d/kek");
        assert_eq!(c.substitute("--x={runtime_dir}:{data_dir}"), "--x=/r:/d");
        assert_eq!(c.substitute("{other} {data_dir"), "{other} {data_dir");
        assert_eq!(c.substitute("{{data_dir}}"), "{/d}");
        assert_eq!(c.substitute("é{data_dir}é"), "é/dé");
        let tricky = Context {
            data_dir: "/x/{runtime_dir}".into(),
            ..ctx(None, None)
        };
        assert_eq!(tricky.substitute("{data_dir}"), "/x/{runtime_dir}");
    }

    #[test]
    fn line_col_counts_lines_and_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 9), (2, 3));
        assert_eq!(line_col(text, 8), (2, 2), "inside a character");
        assert_eq!(line_col(text, 100), (3, 1));
    }

    #[test]
    fn provider_names() {
        for good in ["file", "a", "vault-2", "my_env", &"x".repeat(32)] {
            assert!(is_valid_provider_name(good), "{good}");
        }
        for bad in ["", "File", "a b", "a.b", "é", &"x".repeat(33)] {
            assert!(!is_valid_provider_name(bad), "{bad}");
        }
    }

    #[test]
    fn unknown_field_becomes_unknown_key() {
        let err = parse("data_dir = \"/d\"\ncolour = 1\n", Path::new("/k.toml")).unwrap_err();
        let ConfigError::UnknownKey {
            key,
            line,
            expected,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(key, "colour");
        assert_eq!(*line, Some(2));
        assert!(expected.contains("data_dir"), "{expected}");
    }

    #[cfg(unix)]
    #[test]
    fn bare_commands_resolve_beside_keyhole_then_on_path() {
        use std::os::unix::fs::PermissionsExt;
        let exe = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        let make = |dir: &Path, name: &str, mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let beside = make(exe.path(), "prov", 0o755);
        let on_path = make(bin.path(), "prov", 0o755);
        make(exe.path(), "plain", 0o644);
        let plain_on_path = make(bin.path(), "plain", 0o755);
        let path_var = format!("relative/dir:{}", bin.path().display());
        let c = ctx(Some(exe.path()), Some(&path_var));
        assert_eq!(resolve_command("k", "prov", &c).unwrap(), beside);
        assert_eq!(
            resolve_command("k", "plain", &c).unwrap(),
            plain_on_path,
            "a file that is not executable is skipped"
        );
        let no_exe = ctx(None, Some(&path_var));
        assert_eq!(resolve_command("k", "prov", &no_exe).unwrap(), on_path);
        assert_eq!(
            resolve_command("k", "missing", &c).unwrap(),
            PathBuf::from("missing")
        );
        assert_eq!(
            resolve_command("k", "/opt/p", &c).unwrap(),
            PathBuf::from("/opt/p")
        );
        for bad in ["bin/prov", "./prov", "~/prov", "", " "] {
            let err = resolve_command("providers.x.command", bad, &c).unwrap_err();
            assert_eq!(err.setting(), Some("providers.x.command"), "{bad:?}");
        }
    }
}
