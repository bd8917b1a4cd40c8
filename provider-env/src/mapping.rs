//! Environment variables to secret names, and the snapshot taken at start.
//!
//! The mapping, applied to what follows the prefix:
//!
//! 1. ASCII letters are lowercased (other characters are kept as they are);
//! 2. read left to right, `__` becomes `_` and a lone `_` becomes `/`.
//!
//! So `KEYHOLE_SECRET_DB_PASSWORD` is `db/password`, `KEYHOLE_SECRET_API__KEY` is `api_key` and
//! `KEYHOLE_SECRET_A___B` is `a_/b`. A variable is skipped, with a warning that names the variable
//! and never its value, when its name is not UTF-8, when the mapped name is not a valid keyhole
//! name (empty, over 1024 bytes, a control character), when two variables map to the same name
//! (both are skipped: neither silently wins), or when its value is over the size limit.
//! `KEYHOLE_PROVIDER_TOKEN`, the gateway's one-time token, is never served, whatever the prefix.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use keyhole_providers::protocol::{SecretBytes, TOKEN_ENV, validate_name};

use crate::version_of;

/// The default prefix of the variables served.
pub const DEFAULT_PREFIX: &str = "KEYHOLE_SECRET_";

/// The secret name for what follows the prefix in a variable's name (see the module docs).
pub fn map_suffix(suffix: &str) -> String {
    let mut out = String::with_capacity(suffix.len());
    let mut chars = suffix.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '_' {
            if chars.peek() == Some(&'_') {
                chars.next();
                out.push('_');
            } else {
                out.push('/');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// The secret name for variable `var` under `prefix`: `None` if the variable does not start with
/// the prefix, `Some(Err(reason))` if it does but cannot be served.
pub fn var_to_name(var: &str, prefix: &str) -> Option<Result<String, String>> {
    let suffix = var.strip_prefix(prefix)?;
    if var == TOKEN_ENV {
        return Some(Err("it holds the gateway's one-time token".into()));
    }
    let name = map_suffix(suffix);
    Some(match validate_name(&name) {
        Ok(()) => Ok(name),
        Err(e) => Err(format!("it maps to an invalid secret name ({e})")),
    })
}

/// One variable served as a secret.
pub struct EnvSecret {
    /// The variable's name.
    pub variable: String,
    /// Its value.
    pub value: SecretBytes,
    /// The value's version (a content hash).
    pub version: String,
}

/// A variable under the prefix that is not served, and why. Never holds the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The variable's name (lossy, if it is not UTF-8).
    pub variable: String,
    /// Why it is skipped.
    pub reason: String,
}

/// Takes the variables under `prefix` out of `vars`: the secrets by name, and the variables
/// skipped. Values of variables outside the prefix are not kept.
pub fn snapshot(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
    prefix: &str,
    max_value_size: usize,
) -> (BTreeMap<String, EnvSecret>, Vec<Skipped>) {
    let mut by_name: BTreeMap<String, Vec<(String, SecretBytes)>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for (var, value) in vars {
        if !var.as_encoded_bytes().starts_with(prefix.as_bytes()) {
            continue;
        }
        // Owned without a copy, and zeroized when dropped.
        let value = SecretBytes::new(value.into_vec());
        let var = match var.into_string() {
            Ok(var) => var,
            Err(var) => {
                skipped.push(Skipped {
                    variable: var.to_string_lossy().into_owned(),
                    reason: "its name is not UTF-8".into(),
                });
                continue;
            }
        };
        match var_to_name(&var, prefix) {
            None => {}
            Some(Err(reason)) => skipped.push(Skipped {
                variable: var,
                reason,
            }),
            Some(Ok(_)) if value.len() > max_value_size => skipped.push(Skipped {
                reason: format!(
                    "its value is {} bytes, over the {max_value_size}-byte limit",
                    value.len()
                ),
                variable: var,
            }),
            Some(Ok(name)) => by_name.entry(name).or_default().push((var, value)),
        }
    }
    let mut secrets = BTreeMap::new();
    for (name, mut vars) in by_name {
        if vars.len() > 1 {
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            let all: Vec<&str> = vars.iter().map(|(v, _)| v.as_str()).collect();
            for (var, _) in &vars {
                skipped.push(Skipped {
                    variable: var.clone(),
                    reason: format!(
                        "{} all map to the secret name {name:?}; rename all but one",
                        all.join(", ")
                    ),
                });
            }
            continue;
        }
        if let Some((variable, value)) = vars.pop() {
            let version = version_of(&name, value.expose());
            secrets.insert(
                name,
                EnvSecret {
                    variable,
                    value,
                    version,
                },
            );
        }
    }
    skipped.sort_by(|a, b| a.variable.cmp(&b.variable));
    (secrets, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_examples() {
        for (var, name) in [
            ("KEYHOLE_SECRET_DB_PASSWORD", "db/password"),
            ("KEYHOLE_SECRET_API__KEY", "api_key"),
            ("KEYHOLE_SECRET_A___B", "a_/b"),
            ("KEYHOLE_SECRET_A____B", "a__b"),
            ("KEYHOLE_SECRET_X", "x"),
            ("KEYHOLE_SECRET_TRAILING_", "trailing/"),
            ("KEYHOLE_SECRET__LEADING", "/leading"),
            ("KEYHOLE_SECRET_MiXeD_Case9", "mixed/case9"),
            ("KEYHOLE_SECRET_ÜBER_KEY", "Über/key"),
            ("KEYHOLE_SECRET_A.B-C", "a.b-c"),
        ] {
            assert_eq!(
                var_to_name(var, DEFAULT_PREFIX),
                Some(Ok(name.to_string())),
                "{var}"
            );
        }
    }

    #[test]
    fn other_variables_are_not_ours() {
        assert_eq!(var_to_name("PATH", DEFAULT_PREFIX), None);
        assert_eq!(var_to_name("KEYHOLE_SECRET", DEFAULT_PREFIX), None);
        assert_eq!(var_to_name("keyhole_secret_x", DEFAULT_PREFIX), None);
        assert_eq!(
            var_to_name("APP_DB_USER", "APP_"),
            Some(Ok("db/user".into()))
        );
    }

    #[test]
    fn invalid_names_and_the_token_are_refused() {
        assert!(matches!(
            var_to_name("KEYHOLE_SECRET_", DEFAULT_PREFIX),
            Some(Err(r)) if r.contains("name is empty")
        ));
        assert!(matches!(
            var_to_name("KEYHOLE_SECRET_A\u{1}B", DEFAULT_PREFIX),
            Some(Err(r)) if r.contains("control character")
        ));
        let long = format!("KEYHOLE_SECRET_{}", "X".repeat(1025));
        assert!(matches!(
            var_to_name(&long, DEFAULT_PREFIX),
            Some(Err(r)) if r.contains("longer than")
        ));
        assert!(matches!(
            var_to_name(TOKEN_ENV, "KEYHOLE_"),
            Some(Err(r)) if r.contains("token")
        ));
    }

    #[test]
    fn mapping_is_injective_on_uppercase_suffixes() {
        // Different upper-case suffixes give different names: `__` and `_` never collide.
        let suffixes = [
            "A_B", "A__B", "A___B", "A____B", "AB", "A_", "A__", "_A", "__A",
        ];
        let names: std::collections::BTreeSet<String> =
            suffixes.iter().map(|s| map_suffix(s)).collect();
        assert_eq!(names.len(), suffixes.len(), "{names:?}");
    }

    fn vars(pairs: &[(&str, &[u8])]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from_vec(v.to_vec())))
            .collect()
    }

    #[test]
    fn snapshot_keeps_values_and_reports_skips_without_values() {
        let (secrets, skipped) = snapshot(
            vars(&[
                ("PATH", b"/bin"),
                ("KEYHOLE_SECRET_DB_PASSWORD", b"hunter2"),
                ("KEYHOLE_SECRET_BIN", &[0, 0xff, 0x80]),
                ("KEYHOLE_SECRET_", b"empty-name-value"),
                ("KEYHOLE_SECRET_DUP", b"dup-one"),
                ("KEYHOLE_SECRET_dup", b"dup-two"),
                ("KEYHOLE_SECRET_BIG", &[b'x'; 11]),
                (TOKEN_ENV, b"token"),
            ]),
            DEFAULT_PREFIX,
            10,
        );
        assert_eq!(
            secrets.keys().collect::<Vec<_>>(),
            ["bin", "db/password"],
            "{skipped:?}"
        );
        let db = &secrets["db/password"];
        assert_eq!(db.value.expose(), b"hunter2");
        assert_eq!(db.variable, "KEYHOLE_SECRET_DB_PASSWORD");
        assert_eq!(db.version, version_of("db/password", b"hunter2"));
        assert_eq!(secrets["bin"].value.expose(), &[0, 0xff, 0x80]);
        let skipped_vars: Vec<&str> = skipped.iter().map(|s| s.variable.as_str()).collect();
        assert_eq!(
            skipped_vars,
            [
                "KEYHOLE_SECRET_",
                "KEYHOLE_SECRET_BIG",
                "KEYHOLE_SECRET_DUP",
                "KEYHOLE_SECRET_dup"
            ]
        );
        for s in &skipped {
            for value in ["empty-name-value", "dup-one", "dup-two", "xxxxxxxxxxx"] {
                assert!(!s.reason.contains(value), "{s:?}");
            }
        }
        // The token is not under this prefix at all.
        let (secrets, skipped) = snapshot(vars(&[(TOKEN_ENV, b"t")]), "KEYHOLE_", 10);
        assert!(secrets.is_empty());
        assert_eq!(skipped.len(), 1);
    }

    #[test]
    fn snapshot_skips_names_that_are_not_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let var = std::ffi::OsStr::from_bytes(b"KEYHOLE_SECRET_\xff").to_os_string();
        let (secrets, skipped) = snapshot([(var, OsString::from("v"))], DEFAULT_PREFIX, 10);
        assert!(secrets.is_empty());
        assert_eq!(skipped[0].reason, "its name is not UTF-8");
    }
}
