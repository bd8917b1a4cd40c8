//! The gateway's settings and policy through their public API: files, defaults, environment
//! overrides, validation errors that name their key, and the decisions of loaded policies.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyhole_gateway::config::{Config, ConfigError, ProviderConfig};
use keyhole_gateway::policy::{
    Caller, Decision, NO_RULE_ALLOWS, Operation, Policy, RESOLVE_NEEDS_PURPOSE, Request,
    ScopePattern,
};
use proptest::prelude::*;
use tempfile::TempDir;

const OWNER_UID: u32 = 1000;
const OWNER: Caller = Caller {
    uid: OWNER_UID,
    is_owner: true,
};
const STRANGER: Caller = Caller {
    uid: 4242,
    is_owner: false,
};

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A scratch home directory with a config file in it.
struct Setup {
    home: TempDir,
    file: PathBuf,
}

impl Setup {
    fn new(text: &str) -> Setup {
        let home = tempfile::tempdir().unwrap();
        let file = home.path().join("keyhole.toml");
        std::fs::write(&file, text).unwrap();
        Setup { home, file }
    }

    /// `HOME` and `XDG_RUNTIME_DIR`, plus `extra`.
    fn env(&self, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut env = map(&[
            ("HOME", self.home.path().to_str().unwrap()),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]);
        env.extend(map(extra));
        env
    }

    fn load(&self, extra_env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load_with_env(Some(&self.file), &self.env(extra_env), None)
    }
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Setup::new(text).load(&[])
}

fn load_err(text: &str, extra_env: &[(&str, &str)]) -> ConfigError {
    match Setup::new(text).load(extra_env) {
        Ok(config) => panic!("expected an error, loaded {config:?}"),
        Err(e) => e,
    }
}

/// An executable file at `dir/name`.
fn executable(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    path
}

fn decide(
    policy: &Policy,
    caller: &Caller,
    operation: Operation,
    scope: &str,
    labels: &BTreeMap<String, String>,
) -> Decision {
    policy.decide(&Request {
        caller,
        operation,
        scope,
        labels,
        purpose: Some("deploy the app"),
    })
}

fn allowed(policy: &Policy, caller: &Caller, operation: Operation, scope: &str) -> bool {
    decide(policy, caller, operation, scope, &BTreeMap::new()).is_allowed()
}

#[test]
fn defaults_without_a_file() {
    let home = tempfile::tempdir().unwrap();
    let exe_dir = tempfile::tempdir().unwrap();
    let provider = executable(exe_dir.path(), "keyhole-provider-file");
    let env = map(&[
        ("HOME", home.path().to_str().unwrap()),
        ("PATH", "/usr/bin:/bin"),
    ]);
    let config = Config::load_with_env(None, &env, Some(exe_dir.path())).unwrap();

    let data_dir = home.path().join(".local/share/keyhole");
    assert_eq!(config.data_dir, data_dir);
    #[cfg(unix)]
    assert_eq!(
        config.runtime_dir,
        PathBuf::from(format!("/tmp/keyhole-{}", nix::unistd::geteuid().as_raw()))
    );
    assert_eq!(config.state_db, data_dir.join("state.db"));
    assert_eq!(config.default_provider, "file");
    assert_eq!(config.call_timeout, Duration::from_millis(5000));
    assert_eq!(config.handshake_timeout, Duration::from_millis(5000));
    assert_eq!(config.source, None);
    assert!(config.uses_embedded_providers());
    let data = data_dir.to_str().unwrap();
    let expected = ProviderConfig::Spawn {
        command: provider,
        args: vec![
            "--store".into(),
            format!("{data}/file-store"),
            "--key-file".into(),
            format!("{data}/kek"),
        ],
        env: BTreeMap::new(),
    };
    assert_eq!(
        config.providers,
        BTreeMap::from([("file".to_owned(), expected)])
    );
    assert_eq!(config.policy, Policy::owner_only());
}

#[test]
fn default_command_falls_back_to_path_then_the_bare_name() {
    let home = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let env = map(&[("HOME", home.path().to_str().unwrap())]);
    let command = |config: &Config| match &config.providers["file"] {
        ProviderConfig::Spawn { command, .. } => command.clone(),
        other => panic!("{other:?}"),
    };
    let bare = Config::load_with_env(None, &env, Some(home.path())).unwrap();
    assert_eq!(command(&bare), PathBuf::from("keyhole-provider-file"));

    let on_path = executable(bin.path(), "keyhole-provider-file");
    let mut env = env;
    env.insert("PATH".into(), bin.path().to_str().unwrap().into());
    let found = Config::load_with_env(None, &env, Some(home.path())).unwrap();
    assert_eq!(command(&found), on_path);
}

#[test]
fn xdg_directories_and_the_default_file_location() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let config_home = root.path().join("cfg");
    std::fs::create_dir_all(config_home.join("keyhole")).unwrap();
    let file = config_home.join("keyhole/keyhole.toml");
    std::fs::write(&file, "call_timeout_ms = 1234\n").unwrap();
    let env = map(&[
        ("HOME", "/nonexistent-home"),
        ("XDG_CONFIG_HOME", &format!("{r}/cfg")),
        ("XDG_DATA_HOME", &format!("{r}/data")),
        ("XDG_RUNTIME_DIR", &format!("{r}/run")),
    ]);
    let config = Config::load_with_env(None, &env, None).unwrap();
    assert_eq!(config.source.as_deref(), Some(file.as_path()));
    assert_eq!(config.call_timeout, Duration::from_millis(1234));
    assert_eq!(config.data_dir, root.path().join("data/keyhole"));
    assert_eq!(config.runtime_dir, root.path().join("run/keyhole"));

    // HOME/.config is the fallback; relative XDG values are ignored, as the spec says.
    let home_file = root.path().join(".config/keyhole/keyhole.toml");
    std::fs::create_dir_all(home_file.parent().unwrap()).unwrap();
    std::fs::write(&home_file, "handshake_timeout_ms = 99\n").unwrap();
    let env = map(&[
        ("HOME", r),
        ("XDG_CONFIG_HOME", "relative/cfg"),
        ("XDG_DATA_HOME", "relative/data"),
        ("XDG_RUNTIME_DIR", ""),
    ]);
    let config = Config::load_with_env(None, &env, None).unwrap();
    assert_eq!(config.source.as_deref(), Some(home_file.as_path()));
    assert_eq!(config.handshake_timeout, Duration::from_millis(99));
    assert_eq!(config.data_dir, root.path().join(".local/share/keyhole"));
    #[cfg(unix)]
    assert!(config.runtime_dir.starts_with("/tmp"), "{config:?}");
}

#[test]
fn keyhole_config_names_the_file_and_an_explicit_path_wins() {
    let by_env = Setup::new("call_timeout_ms = 111\n");
    let explicit = Setup::new("call_timeout_ms = 222\n");
    let env = by_env.env(&[("KEYHOLE_CONFIG", by_env.file.to_str().unwrap())]);
    let config = Config::load_with_env(None, &env, None).unwrap();
    assert_eq!(config.call_timeout, Duration::from_millis(111));
    assert_eq!(config.source.as_deref(), Some(by_env.file.as_path()));
    let config = Config::load_with_env(Some(&explicit.file), &env, None).unwrap();
    assert_eq!(config.call_timeout, Duration::from_millis(222));
}

#[test]
fn a_named_file_that_is_missing_is_fatal() {
    let home = tempfile::tempdir().unwrap();
    let missing = home.path().join("nope.toml");
    let env = map(&[("HOME", home.path().to_str().unwrap())]);
    let err = Config::load_with_env(Some(&missing), &env, None).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.toml"), "{err}");

    let env = map(&[
        ("HOME", home.path().to_str().unwrap()),
        ("KEYHOLE_CONFIG", missing.to_str().unwrap()),
    ]);
    let err = Config::load_with_env(None, &env, None).unwrap_err();
    assert!(err.to_string().contains("KEYHOLE_CONFIG"), "{err}");
    assert!(!err.to_string().ends_with('.'), "{err}");
}

#[test]
fn a_full_file() {
    let setup = Setup::new(
        r#"
data_dir = "/srv/keyhole/data"
runtime_dir = "/run/keyhole"
state_db = "/srv/keyhole/db/state.db"
default_provider = "sidecar"
call_timeout_ms = 2500
handshake_timeout_ms = 10000

[providers.file]
kind = "spawn"
command = "/opt/keyhole/keyhole-provider-file"
args = ["--store", "{data_dir}/file-store", "--socket-dir", "{runtime_dir}"]
env = { KEYHOLE_LOG = "info", STORE = "{data_dir}/s" }

[providers.sidecar]
kind = "connect"
socket = "{runtime_dir}/env.sock"
token_file = "/run/keyhole/env.token"
uid = 1001

[providers.vault-2]
kind = "connect"
socket = "/run/vault.sock"
token_file = "/run/vault.token"

[[policy]]
effect = "allow"
callers = ["owner", "uid:1001"]
operations = ["*"]
scopes = ["*"]

[[policy]]
effect = "allow"
callers = ["*"]
operations = ["resolve", "describe"]
scopes = ["ci/*", "shared"]
labels = { team = "infra" }

[[policy]]
effect = "deny"
callers = ["uid:1001"]
operations = ["revoke"]
scopes = ["prod/*"]
"#,
    );
    let config = setup.load(&[]).unwrap();
    assert_eq!(config.data_dir, PathBuf::from("/srv/keyhole/data"));
    assert_eq!(config.runtime_dir, PathBuf::from("/run/keyhole"));
    assert_eq!(config.state_db, PathBuf::from("/srv/keyhole/db/state.db"));
    assert_eq!(config.default_provider, "sidecar");
    assert_eq!(config.call_timeout, Duration::from_millis(2500));
    assert_eq!(config.handshake_timeout, Duration::from_secs(10));
    assert_eq!(config.source.as_deref(), Some(setup.file.as_path()));
    assert!(!config.uses_embedded_providers());
    assert_eq!(
        config.providers.keys().collect::<Vec<_>>(),
        ["file", "sidecar", "vault-2"]
    );
    assert_eq!(
        config.providers["file"],
        ProviderConfig::Spawn {
            command: "/opt/keyhole/keyhole-provider-file".into(),
            args: vec![
                "--store".into(),
                "/srv/keyhole/data/file-store".into(),
                "--socket-dir".into(),
                "/run/keyhole".into(),
            ],
            env: map(&[("KEYHOLE_LOG", "info"), ("STORE", "/srv/keyhole/data/s")]),
        }
    );
    assert_eq!(
        config.providers["sidecar"],
        ProviderConfig::Connect {
            socket: "/run/keyhole/env.sock".into(),
            token_file: "/run/keyhole/env.token".into(),
            uid: Some(1001),
        }
    );
    assert_eq!(
        config.providers["vault-2"],
        ProviderConfig::Connect {
            socket: "/run/vault.sock".into(),
            token_file: "/run/vault.token".into(),
            uid: None,
        }
    );

    let policy = &config.policy;
    assert_eq!(policy.rules().len(), 3);
    let uid_1001 = Caller {
        uid: 1001,
        is_owner: false,
    };
    assert!(allowed(policy, &OWNER, Operation::Put, "anything"));
    assert!(allowed(policy, &uid_1001, Operation::Revoke, "dev/x"));
    assert!(!allowed(policy, &uid_1001, Operation::Revoke, "prod/x"));
    assert!(allowed(policy, &OWNER, Operation::Revoke, "prod/x"));
    let infra = map(&[("team", "infra")]);
    let ops = map(&[("team", "ops")]);
    let resolve = Operation::Resolve;
    assert!(decide(policy, &STRANGER, resolve, "ci/deploy", &infra).is_allowed());
    assert!(decide(policy, &STRANGER, resolve, "shared", &infra).is_allowed());
    assert!(!decide(policy, &STRANGER, resolve, "ci/deploy", &ops).is_allowed());
    assert!(!decide(policy, &STRANGER, resolve, "ci", &infra).is_allowed());
    assert!(!decide(policy, &STRANGER, Operation::Put, "ci/deploy", &infra).is_allowed());
}

#[test]
fn provider_env_values_stay_out_of_debug_output() {
    let config = load(
        r#"
default_provider = "vault"
[providers.vault]
kind = "spawn"
command = "/opt/p"
env = { VAULT_TOKEN = "s.hunter2-very-secret" }
"#,
    )
    .unwrap();
    let debug = format!("{config:?}");
    assert!(debug.contains("VAULT_TOKEN"), "{debug}");
    assert!(!debug.contains("hunter2"), "{debug}");
}

#[test]
fn each_environment_override_wins_over_the_file() {
    let setup = Setup::new(
        r#"
data_dir = "/file/data"
runtime_dir = "/file/run"
state_db = "/file/state.db"
default_provider = "a"
call_timeout_ms = 100
handshake_timeout_ms = 200
[providers.a]
kind = "spawn"
command = "/bin/a"
args = ["{data_dir}", "{runtime_dir}"]
[providers.b]
kind = "spawn"
command = "/bin/b"
"#,
    );
    let base = setup.load(&[]).unwrap();
    assert_eq!(base.data_dir, PathBuf::from("/file/data"));
    assert_eq!(base.default_provider, "a");

    let c = setup.load(&[("KEYHOLE_DATA_DIR", "/env/data")]).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/env/data"));
    assert_eq!(c.state_db, PathBuf::from("/file/state.db"));
    let ProviderConfig::Spawn { args, .. } = &c.providers["a"] else {
        panic!("{c:?}")
    };
    assert_eq!(
        args,
        &["/env/data", "/file/run"],
        "substituted after overrides"
    );

    let c = setup.load(&[("KEYHOLE_RUNTIME_DIR", "/env/run")]).unwrap();
    assert_eq!(c.runtime_dir, PathBuf::from("/env/run"));

    let c = setup.load(&[("KEYHOLE_STATE_DB", "/env/db")]).unwrap();
    assert_eq!(c.state_db, PathBuf::from("/env/db"));

    let c = setup.load(&[("KEYHOLE_DEFAULT_PROVIDER", "b")]).unwrap();
    assert_eq!(c.default_provider, "b");

    let c = setup
        .load(&[("KEYHOLE_CALL_TIMEOUT_MS", "600000")])
        .unwrap();
    assert_eq!(c.call_timeout, Duration::from_secs(600));

    let c = setup
        .load(&[("KEYHOLE_HANDSHAKE_TIMEOUT_MS", "1")])
        .unwrap();
    assert_eq!(c.handshake_timeout, Duration::from_millis(1));

    // Without a data_dir in the file, state_db follows the overridden data_dir.
    let c = Setup::new("")
        .load(&[("KEYHOLE_DATA_DIR", "/env/data")])
        .unwrap();
    assert_eq!(c.state_db, PathBuf::from("/env/data/state.db"));
}

#[test]
fn a_malformed_override_names_the_variable() {
    let cases = [
        ("KEYHOLE_DATA_DIR", "relative/data"),
        ("KEYHOLE_DATA_DIR", ""),
        ("KEYHOLE_RUNTIME_DIR", "~/run"),
        ("KEYHOLE_STATE_DB", "state.db"),
        ("KEYHOLE_DEFAULT_PROVIDER", "nope"),
        ("KEYHOLE_DEFAULT_PROVIDER", " "),
        ("KEYHOLE_CALL_TIMEOUT_MS", "abc"),
        ("KEYHOLE_CALL_TIMEOUT_MS", "0"),
        ("KEYHOLE_CALL_TIMEOUT_MS", "600001"),
        ("KEYHOLE_CALL_TIMEOUT_MS", "-5"),
        ("KEYHOLE_HANDSHAKE_TIMEOUT_MS", "5s"),
    ];
    for (var, value) in cases {
        let err = load_err("", &[(var, value)]);
        assert!(
            matches!(err, ConfigError::Env { .. }),
            "{var}={value:?}: {err:?}"
        );
        assert_eq!(err.setting(), Some(var), "{var}={value:?}");
        let message = err.to_string();
        assert!(message.contains(var), "{message}");
        assert!(!message.ends_with('.'), "{message}");
    }
    // KEYHOLE_CONFIG is read only when no path is given.
    let setup = Setup::new("");
    let env = setup.env(&[("KEYHOLE_CONFIG", "")]);
    let err = Config::load_with_env(None, &env, None).unwrap_err();
    assert_eq!(err.setting(), Some("KEYHOLE_CONFIG"), "{err}");
    assert!(Config::load_with_env(Some(&setup.file), &env, None).is_ok());
}

#[test]
fn each_validation_error_names_its_key() {
    let spawn = "kind = \"spawn\"\ncommand = \"/bin/p\"\n";
    let cases: Vec<(String, &str)> = vec![
        ("call_timeout_ms = 0".into(), "call_timeout_ms"),
        ("call_timeout_ms = 600001".into(), "call_timeout_ms"),
        ("handshake_timeout_ms = -1".into(), "handshake_timeout_ms"),
        ("data_dir = \"relative\"".into(), "data_dir"),
        ("runtime_dir = \"~/run\"".into(), "runtime_dir"),
        ("state_db = \"\"".into(), "state_db"),
        ("default_provider = \"vault\"".into(), "default_provider"),
        ("[providers]".into(), "default_provider"),
        (
            format!("default_provider = \"x\"\n[providers.x]\n{spawn}[providers.Bad]\n{spawn}"),
            "providers.Bad",
        ),
        (
            format!("[providers.{}]\n{spawn}", "x".repeat(33)),
            "providers.xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        ),
        (
            "[providers.file]\ncommand = \"/bin/p\"".into(),
            "providers.file.kind",
        ),
        (
            "[providers.file]\nkind = \"exec\"".into(),
            "providers.file.kind",
        ),
        (
            "[providers.file]\nkind = \"spawn\"".into(),
            "providers.file.command",
        ),
        (
            "[providers.file]\nkind = \"spawn\"\ncommand = \"\"".into(),
            "providers.file.command",
        ),
        (
            "[providers.file]\nkind = \"spawn\"\ncommand = \"bin/p\"".into(),
            "providers.file.command",
        ),
        (
            format!("[providers.file]\n{spawn}socket = \"/s\""),
            "providers.file.socket",
        ),
        (
            "[providers.file]\nkind = \"connect\"\ntoken_file = \"/t\"".into(),
            "providers.file.socket",
        ),
        (
            "[providers.file]\nkind = \"connect\"\nsocket = \"/s\"".into(),
            "providers.file.token_file",
        ),
        (
            "[providers.file]\nkind = \"connect\"\nsocket = \"s.sock\"\ntoken_file = \"/t\"".into(),
            "providers.file.socket",
        ),
        (
            "[providers.file]\nkind = \"connect\"\nsocket = \"/s\"\ntoken_file = \"/t\"\nuid = -1"
                .into(),
            "providers.file.uid",
        ),
        (
            "[providers.file]\nkind = \"connect\"\nsocket = \"/s\"\ntoken_file = \"/t\"\ncommand = \"/x\""
                .into(),
            "providers.file.command",
        ),
        (
            "[[policy]]\neffect = \"permit\"\ncallers = [\"owner\"]\noperations = [\"*\"]\nscopes = [\"*\"]"
                .into(),
            "policy[0].effect",
        ),
        (
            "[[policy]]\ncallers = [\"owner\"]\noperations = [\"*\"]\nscopes = [\"*\"]".into(),
            "policy[0].effect",
        ),
        (
            "[[policy]]\neffect = \"allow\"\ncallers = [\"owner\"]\noperations = [\"*\"]\nscopes = [\"*\"]\n\
             [[policy]]\neffect = \"allow\"\ncallers = [\"owner\"]\noperations = [\"put\", \"delete\"]\nscopes = [\"*\"]"
                .into(),
            "policy[1].operations",
        ),
        (
            "[[policy]]\neffect = \"allow\"\ncallers = [\"root\"]\noperations = [\"*\"]\nscopes = [\"*\"]"
                .into(),
            "policy[0].callers",
        ),
        (
            "[[policy]]\neffect = \"allow\"\ncallers = []\noperations = [\"*\"]\nscopes = [\"*\"]".into(),
            "policy[0].callers",
        ),
        (
            "[[policy]]\neffect = \"allow\"\ncallers = [\"*\"]\noperations = [\"*\"]\nscopes = [\"ci*\"]"
                .into(),
            "policy[0].scopes",
        ),
        (
            "[[policy]]\neffect = \"allow\"\ncallers = [\"*\"]\noperations = [\"*\"]".into(),
            "policy[0].scopes",
        ),
    ];
    for (text, key) in cases {
        let err = load_err(&text, &[]);
        assert_eq!(err.setting(), Some(key), "{text}\n=> {err}");
        let message = err.to_string();
        assert!(message.contains(key), "{message}");
        assert!(message.contains(" — "), "says what to do next: {message}");
        assert!(!message.ends_with('.'), "{message}");
    }
}

#[test]
fn a_missing_data_dir_is_fatal_and_says_how_to_set_it() {
    let env = map(&[("XDG_RUNTIME_DIR", "/run/user/1")]);
    let err = Config::load_with_env(None, &env, None).unwrap_err();
    assert!(matches!(err, ConfigError::Missing { .. }), "{err:?}");
    assert_eq!(err.setting(), Some("data_dir"));
    let message = err.to_string();
    assert!(
        message.starts_with("required setting \"data_dir\" is missing — "),
        "{message}"
    );
    assert!(message.contains("KEYHOLE_DATA_DIR"), "{message}");
    let env = map(&[("KEYHOLE_DATA_DIR", "/d")]);
    assert!(Config::load_with_env(None, &env, None).is_ok());
}

#[test]
fn unknown_keys_are_refused_anywhere() {
    let cases = [
        ("data_dir = \"/d\"\ncolour = \"blue\"\n", "colour", 2),
        (
            "[providers.file]\nkind = \"spawn\"\ncommand = \"/p\"\ncomand = \"/p\"\n",
            "comand",
            4,
        ),
        (
            "[[policy]]\neffect = \"allow\"\ncaller = [\"owner\"]\n",
            "caller",
            3,
        ),
        ("[server]\nport = 1\n", "server", 1),
    ];
    for (text, key, line) in cases {
        let err = load_err(text, &[]);
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{err:?}");
        assert_eq!(err.setting(), Some(key), "{text}");
        assert_eq!(err.line(), Some(line), "{text}");
        let message = err.to_string();
        assert!(
            message.contains(&format!("unknown key \"{key}\"")),
            "{message}"
        );
        assert!(message.contains(&format!("line {line}")), "{message}");
    }
}

#[test]
fn a_toml_syntax_error_names_the_file_and_line() {
    let setup = Setup::new("data_dir = \"/d\"\n\ncall_timeout_ms = = 5\n");
    let err = setup.load(&[]).unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    assert_eq!(err.line(), Some(3));
    let message = err.to_string();
    assert!(message.contains("line 3"), "{message}");
    assert!(message.contains(setup.file.to_str().unwrap()), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");

    let err = load_err("call_timeout_ms = \"fast\"\n", &[]);
    assert_eq!(
        err.line(),
        Some(1),
        "a wrong type names its line too: {err}"
    );
}

#[test]
fn load_reads_the_named_file() {
    let setup = Setup::new(
        "data_dir = \"/srv/d\"\ndefault_provider = \"p\"\n[providers.p]\nkind = \"spawn\"\ncommand = \"/bin/p\"\n",
    );
    match Config::load(Some(&setup.file)) {
        Ok(config) => assert_eq!(config.source.as_deref(), Some(setup.file.as_path())),
        // The process environment may carry KEYHOLE_* overrides; they must be the reason.
        Err(e) => assert!(
            e.setting().is_some_and(|s| s.starts_with("KEYHOLE_")),
            "{e}"
        ),
    }
}

fn policy_of(rules: &str) -> Policy {
    load(rules).unwrap().policy
}

#[test]
fn an_empty_policy_denies_everything() {
    let policy = policy_of("policy = []\n");
    assert!(policy.rules().is_empty());
    for op in Operation::ALL {
        assert_eq!(
            decide(&policy, &OWNER, op, "x", &BTreeMap::new()),
            Decision::Deny(NO_RULE_ALLOWS.into())
        );
    }
}

#[test]
fn the_default_policy_is_owner_only() {
    let policy = policy_of("");
    assert_eq!(policy, Policy::owner_only());
    for op in Operation::ALL {
        assert!(allowed(&policy, &OWNER, op, "any/scope"), "{op}");
        assert_eq!(
            decide(&policy, &STRANGER, op, "any/scope", &BTreeMap::new()),
            Decision::Deny(NO_RULE_ALLOWS.into()),
            "uid:4242 {op}"
        );
    }
}

#[test]
fn an_explicit_deny_beats_an_allow() {
    let policy = policy_of(
        r#"
[[policy]]
effect = "deny"
callers = ["uid:4242"]
operations = ["resolve"]
scopes = ["prod/*"]

[[policy]]
effect = "allow"
callers = ["*"]
operations = ["*"]
scopes = ["*"]
"#,
    );
    let Decision::Deny(reason) = decide(
        &policy,
        &STRANGER,
        Operation::Resolve,
        "prod/db",
        &BTreeMap::new(),
    ) else {
        panic!("the deny rule must win");
    };
    assert!(reason.starts_with("denied by policy[0]"), "{reason}");
    assert!(allowed(&policy, &STRANGER, Operation::Resolve, "dev/db"));
    assert!(allowed(&policy, &STRANGER, Operation::Describe, "prod/db"));
    assert!(allowed(&policy, &OWNER, Operation::Resolve, "prod/db"));
}

#[test]
fn scope_globs() {
    let policy = policy_of(
        r#"
[[policy]]
effect = "allow"
callers = ["*"]
operations = ["describe"]
scopes = ["ci/*", "exact"]
"#,
    );
    let d = Operation::Describe;
    assert!(allowed(&policy, &STRANGER, d, "ci/a"));
    assert!(allowed(&policy, &STRANGER, d, "ci/a/b/c"));
    assert!(!allowed(&policy, &STRANGER, d, "ci"));
    assert!(!allowed(&policy, &STRANGER, d, "cix/a"));
    assert!(allowed(&policy, &STRANGER, d, "exact"));
    assert!(!allowed(&policy, &STRANGER, d, "exact/sub"));
    assert!(!allowed(&policy, &STRANGER, d, "exactly"));
}

#[test]
fn labels_must_all_match() {
    let policy = policy_of(
        r#"
[[policy]]
effect = "allow"
callers = ["uid:4242"]
operations = ["*"]
scopes = ["*"]
labels = { team = "infra", env = "prod" }
"#,
    );
    let op = Operation::Rotate;
    let both = map(&[("team", "infra"), ("env", "prod"), ("other", "x")]);
    assert!(decide(&policy, &STRANGER, op, "s", &both).is_allowed());
    for labels in [
        map(&[("team", "infra")]),
        map(&[("team", "infra"), ("env", "dev")]),
        BTreeMap::new(),
    ] {
        assert!(
            !decide(&policy, &STRANGER, op, "s", &labels).is_allowed(),
            "{labels:?}"
        );
    }
}

#[test]
fn resolve_without_a_purpose_is_denied_even_for_the_owner() {
    let policy = policy_of("");
    let labels = BTreeMap::new();
    for purpose in [None, Some(""), Some("   ")] {
        let decision = policy.decide(&Request {
            caller: &OWNER,
            operation: Operation::Resolve,
            scope: "s",
            labels: &labels,
            purpose,
        });
        assert_eq!(decision, Decision::Deny(RESOLVE_NEEDS_PURPOSE.into()));
    }
    assert_eq!(
        RESOLVE_NEEDS_PURPOSE,
        "resolve requires a purpose (--purpose TEXT)"
    );
    assert!(decide(&policy, &OWNER, Operation::Resolve, "s", &labels).is_allowed());
}

#[test]
fn star_operations_cover_every_operation_and_a_list_only_its_own() {
    let policy = policy_of(
        r#"
[[policy]]
effect = "allow"
callers = ["uid:4242"]
operations = ["*"]
scopes = ["a/*"]

[[policy]]
effect = "allow"
callers = ["uid:4242"]
operations = ["list", "providers"]
scopes = ["*"]
"#,
    );
    for op in Operation::ALL {
        assert!(allowed(&policy, &STRANGER, op, "a/x"), "{op}");
        let elsewhere = allowed(&policy, &STRANGER, op, "b/x");
        assert_eq!(
            elsewhere,
            matches!(op, Operation::List | Operation::Providers),
            "{op}"
        );
    }
}

proptest! {
    #[test]
    fn prefix_globs_match_exactly_the_scopes_under_them(
        prefix in "[a-z]{1,8}(/[a-z]{1,8}){0,2}",
        rest in "[a-z/]{0,16}",
        other in "[a-z/]{0,24}",
    ) {
        let glob: ScopePattern = format!("{prefix}/*").parse().unwrap();
        let under = format!("{prefix}/{rest}");
        prop_assert!(glob.matches(&under));
        prop_assert!(!glob.matches(&prefix));
        prop_assert_eq!(glob.matches(&other), other.starts_with(&format!("{prefix}/")));
    }
}

#[test]
fn a_wrong_typed_value_is_not_quoted_in_the_error() {
    // serde's wording quotes the value it found ("invalid type: string \"...\", expected a map"),
    // and a config file's values may be credentials: the error names the line, not the value.
    let cases = [
        "[providers.v]\nkind = \"spawn\"\ncommand = \"/p\"\nenv = \"hunter2-tok\"\n",
        "[providers.v]\nkind = \"spawn\"\ncommand = \"/p\"\nargs = \"hunter2-tok\"\n",
        "[providers.v]\nkind = \"spawn\"\ncommand = \"/p\"\nenv = { TOKEN = [\"hunter2-tok\"] }\n",
        "[providers.v]\nkind = \"spawn\"\ncommand = \"/p\"\nenv = { TOKEN = 424242 }\n",
        "call_timeout_ms = \"hunter2-tok\"\n",
    ];
    for text in cases {
        let err = load_err(text, &[]);
        let message = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        assert!(err.line().is_some(), "{message}");
        for secret in ["hunter2-tok", "424242"] {
            assert!(!message.contains(secret), "{message}");
            assert!(!format!("{err:?}").contains(secret), "{err:?}");
        }
    }
}
