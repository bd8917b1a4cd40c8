//! Who may do what: deny by default.
//!
//! A [`Policy`] is an ordered list of [`Rule`]s. A request is allowed only if some allow rule
//! matches it and no deny rule does: an explicit deny always wins, whatever the order. A
//! [`Operation::Resolve`] additionally needs a stated purpose (non-empty once trimmed); without
//! one it is denied whatever the rules say.
//!
//! A rule matches a request when each of its parts matches:
//! - **callers**: `owner` (the gateway's own uid), `uid:<number>` or `*`; any one listed suffices;
//! - **operations**: an [`Operation`] name or `*`; any one listed suffices;
//! - **scopes**: an exact scope, a prefix glob `ci/*` (`ci/` followed by anything, nested
//!   included, but not `ci` itself) or `*`; any one listed suffices;
//! - **labels**: every label the rule lists must be on the handle with an equal value.
//!
//! The types here are gateway internals: they are built from the configuration
//! ([`crate::config`]) and are not serialized.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The reason of a denial when no allow rule matches.
pub const NO_RULE_ALLOWS: &str = "no rule allows it";

/// The reason of a denial when a resolve states no purpose.
pub const RESOLVE_NEEDS_PURPOSE: &str = "resolve requires a purpose (--purpose TEXT)";

/// A policy string that could not be understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Not one of the operation names (or `*` where a pattern is allowed).
    #[error(
        "unknown operation {0:?} — use one of put, link, rotate, revoke, describe, list, \
         resolve, providers, audit, or \"*\" for all"
    )]
    UnknownOperation(String),
    /// Not `allow` or `deny`.
    #[error("unknown effect {0:?} — use \"allow\" or \"deny\"")]
    UnknownEffect(String),
    /// Not `owner`, `uid:<number>` or `*`.
    #[error(
        "{0:?} is not a caller — use \"owner\", \"uid:<number>\" (such as \"uid:1000\") or \"*\""
    )]
    BadCaller(String),
    /// Empty, or a `*` anywhere but alone or in a trailing `/*`.
    #[error(
        "{0:?} is not a scope pattern — use an exact scope, a prefix glob such as \"ci/*\", \
         or \"*\" for every scope"
    )]
    BadScope(String),
}

/// An operation a client asks the gateway for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// Store a new secret and get a handle for it.
    Put,
    /// Get a handle for a secret a provider already holds. Separate from `put` because it can
    /// reach a value someone else stored: a rule must name it (or `*`) to allow it.
    Link,
    /// Replace a secret's value with a new version.
    Rotate,
    /// Revoke a secret.
    Revoke,
    /// Show a handle's metadata (never its value).
    Describe,
    /// List handles (never values).
    List,
    /// Read a secret's value, to inject it into a trusted context.
    Resolve,
    /// Show the providers' status and health.
    Providers,
    /// Read or verify the audit log.
    Audit,
}

impl Operation {
    /// Every operation, in declaration order.
    pub const ALL: [Operation; 9] = [
        Operation::Put,
        Operation::Link,
        Operation::Rotate,
        Operation::Revoke,
        Operation::Describe,
        Operation::List,
        Operation::Resolve,
        Operation::Providers,
        Operation::Audit,
    ];

    /// The operation's name in configuration and logs: `put`, `rotate`, ….
    pub fn name(self) -> &'static str {
        match self {
            Operation::Put => "put",
            Operation::Link => "link",
            Operation::Rotate => "rotate",
            Operation::Revoke => "revoke",
            Operation::Describe => "describe",
            Operation::List => "list",
            Operation::Resolve => "resolve",
            Operation::Providers => "providers",
            Operation::Audit => "audit",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Operation {
    type Err = PolicyError;

    /// Parses an operation's exact (lowercase) name.
    fn from_str(s: &str) -> Result<Operation, PolicyError> {
        Operation::ALL
            .into_iter()
            .find(|op| op.name() == s)
            .ok_or_else(|| PolicyError::UnknownOperation(s.into()))
    }
}

/// Who is asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The peer's uid, as the operating system reported it.
    pub uid: u32,
    /// Whether `uid` is the gateway's own effective uid.
    pub is_owner: bool,
}

impl Caller {
    /// A caller with `uid`, the owner when it equals `gateway_euid`.
    pub fn new(uid: u32, gateway_euid: u32) -> Caller {
        Caller {
            uid,
            is_owner: uid == gateway_euid,
        }
    }
}

/// One request to decide on.
///
/// Operations that concern no handle (`providers`, `audit`) pass a scope no handle has, such as
/// `*` or `""`, and no labels: only rules whose scopes include `*` and that list no labels match
/// them.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Who is asking.
    pub caller: &'a Caller,
    /// What for.
    pub operation: Operation,
    /// The handle's scope.
    pub scope: &'a str,
    /// The handle's labels.
    pub labels: &'a BTreeMap<String, String>,
    /// The purpose the caller stated, if any.
    pub purpose: Option<&'a str>,
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refused, with the reason for humans and the audit log: the rule that denied it,
    /// [`NO_RULE_ALLOWS`] or [`RESOLVE_NEEDS_PURPOSE`].
    Deny(String),
}

impl Decision {
    /// Whether the request is allowed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Allows the request, unless a deny rule matches too.
    Allow,
    /// Denies the request, whatever else matches.
    Deny,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        })
    }
}

impl FromStr for Effect {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Effect, PolicyError> {
        match s {
            "allow" => Ok(Effect::Allow),
            "deny" => Ok(Effect::Deny),
            other => Err(PolicyError::UnknownEffect(other.into())),
        }
    }
}

/// Which callers a rule is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerPattern {
    /// `owner`: the gateway's own uid.
    Owner,
    /// `uid:<number>`: that uid.
    Uid(u32),
    /// `*`: anyone who can reach the gateway's socket.
    Any,
}

impl CallerPattern {
    /// Whether `caller` is one of these.
    pub fn matches(self, caller: &Caller) -> bool {
        match self {
            CallerPattern::Owner => caller.is_owner,
            CallerPattern::Uid(uid) => caller.uid == uid,
            CallerPattern::Any => true,
        }
    }
}

impl fmt::Display for CallerPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallerPattern::Owner => f.write_str("owner"),
            CallerPattern::Uid(uid) => write!(f, "uid:{uid}"),
            CallerPattern::Any => f.write_str("*"),
        }
    }
}

impl FromStr for CallerPattern {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<CallerPattern, PolicyError> {
        match s {
            "owner" => Ok(CallerPattern::Owner),
            "*" => Ok(CallerPattern::Any),
            _ => s
                .strip_prefix("uid:")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .map(CallerPattern::Uid)
                .ok_or_else(|| PolicyError::BadCaller(s.into())),
        }
    }
}

/// Which operations a rule is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationPattern {
    /// `*`: every operation.
    Any,
    /// Exactly this one.
    Only(Operation),
}

impl OperationPattern {
    /// Whether `operation` is one of these.
    pub fn matches(self, operation: Operation) -> bool {
        match self {
            OperationPattern::Any => true,
            OperationPattern::Only(op) => op == operation,
        }
    }
}

impl fmt::Display for OperationPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OperationPattern::Any => f.write_str("*"),
            OperationPattern::Only(op) => f.write_str(op.name()),
        }
    }
}

impl FromStr for OperationPattern {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<OperationPattern, PolicyError> {
        if s == "*" {
            Ok(OperationPattern::Any)
        } else {
            s.parse().map(OperationPattern::Only)
        }
    }
}

/// Which handle scopes a rule is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopePattern {
    /// `*`: every scope.
    Any,
    /// `prefix/*`: scopes that start with `prefix/` (held with its trailing `/`, without the `*`).
    Prefix(String),
    /// Exactly this scope.
    Exact(String),
}

impl ScopePattern {
    /// Whether `scope` is one of these.
    pub fn matches(&self, scope: &str) -> bool {
        match self {
            ScopePattern::Any => true,
            ScopePattern::Prefix(prefix) => scope.starts_with(prefix.as_str()),
            ScopePattern::Exact(exact) => scope == exact,
        }
    }
}

impl fmt::Display for ScopePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopePattern::Any => f.write_str("*"),
            ScopePattern::Prefix(prefix) => write!(f, "{prefix}*"),
            ScopePattern::Exact(exact) => f.write_str(exact),
        }
    }
}

impl FromStr for ScopePattern {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<ScopePattern, PolicyError> {
        if s == "*" {
            return Ok(ScopePattern::Any);
        }
        let (body, is_prefix) = match s.strip_suffix("/*") {
            Some(head) => (head, true),
            None => (s, false),
        };
        if body.contains('*') || (!is_prefix && body.is_empty()) {
            return Err(PolicyError::BadScope(s.into()));
        }
        Ok(if is_prefix {
            ScopePattern::Prefix(format!("{body}/"))
        } else {
            ScopePattern::Exact(body.into())
        })
    }
}

/// One policy rule: an effect and what it applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    effect: Effect,
    callers: Vec<CallerPattern>,
    operations: Vec<OperationPattern>,
    scopes: Vec<ScopePattern>,
    labels: BTreeMap<String, String>,
}

impl Rule {
    /// A rule. An empty `callers`, `operations` or `scopes` list matches nothing; an empty
    /// `labels` map constrains nothing.
    pub fn new(
        effect: Effect,
        callers: Vec<CallerPattern>,
        operations: Vec<OperationPattern>,
        scopes: Vec<ScopePattern>,
        labels: BTreeMap<String, String>,
    ) -> Rule {
        Rule {
            effect,
            callers,
            operations,
            scopes,
            labels,
        }
    }

    /// Allow or deny.
    pub fn effect(&self) -> Effect {
        self.effect
    }

    /// The callers it applies to (any one suffices).
    pub fn callers(&self) -> &[CallerPattern] {
        &self.callers
    }

    /// The operations it applies to (any one suffices).
    pub fn operations(&self) -> &[OperationPattern] {
        &self.operations
    }

    /// The scopes it applies to (any one suffices).
    pub fn scopes(&self) -> &[ScopePattern] {
        &self.scopes
    }

    /// The labels a handle must carry, each with an equal value.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// Whether the rule applies to `req` (the purpose plays no part here).
    pub fn matches(&self, req: &Request<'_>) -> bool {
        self.callers.iter().any(|c| c.matches(req.caller))
            && self.operations.iter().any(|o| o.matches(req.operation))
            && self.scopes.iter().any(|s| s.matches(req.scope))
            && self
                .labels
                .iter()
                .all(|(key, value)| req.labels.get(key) == Some(value))
    }
}

/// Writes `items` as `[a, b]`.
fn write_list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    f.write_str("[")?;
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{item}")?;
    }
    f.write_str("]")
}

impl fmt::Display for Rule {
    /// A one-line summary: `deny callers [uid:4242] operations [resolve] scopes [ci/*]`, then
    /// ` labels {team=infra}` when it has labels.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} callers ", self.effect)?;
        write_list(f, &self.callers)?;
        f.write_str(" operations ")?;
        write_list(f, &self.operations)?;
        f.write_str(" scopes ")?;
        write_list(f, &self.scopes)?;
        if !self.labels.is_empty() {
            f.write_str(" labels {")?;
            for (i, (key, value)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{key}={value}")?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

/// An ordered list of rules, deny by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// A policy of these rules. With none, every request is denied.
    pub fn new(rules: Vec<Rule>) -> Policy {
        Policy { rules }
    }

    /// The default: the gateway's owner may do everything in every scope, and nobody else
    /// anything.
    pub fn owner_only() -> Policy {
        Policy::new(vec![Rule::new(
            Effect::Allow,
            vec![CallerPattern::Owner],
            vec![OperationPattern::Any],
            vec![ScopePattern::Any],
            BTreeMap::new(),
        )])
    }

    /// The rules, in order (`policy[i]` in the configuration is `rules()[i]`).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Decides `req`: allowed only if some allow rule matches and no deny rule does, and, for a
    /// resolve, a purpose is stated.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        if req.operation == Operation::Resolve && req.purpose.is_none_or(|p| p.trim().is_empty()) {
            return Decision::Deny(RESOLVE_NEEDS_PURPOSE.into());
        }
        let mut allowed = false;
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.matches(req) {
                match rule.effect {
                    Effect::Deny => {
                        return Decision::Deny(format!("denied by policy[{i}]: {rule}"));
                    }
                    Effect::Allow => allowed = true,
                }
            }
        }
        if allowed {
            Decision::Allow
        } else {
            Decision::Deny(NO_RULE_ALLOWS.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: Caller = Caller {
        uid: 1000,
        is_owner: true,
    };
    const STRANGER: Caller = Caller {
        uid: 4242,
        is_owner: false,
    };

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn rule(effect: &str, callers: &[&str], ops: &[&str], scopes: &[&str]) -> Rule {
        Rule::new(
            effect.parse().unwrap(),
            callers.iter().map(|c| c.parse().unwrap()).collect(),
            ops.iter().map(|o| o.parse().unwrap()).collect(),
            scopes.iter().map(|s| s.parse().unwrap()).collect(),
            BTreeMap::new(),
        )
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
            purpose: Some("deploy"),
        })
    }

    #[test]
    fn operation_names_round_trip() {
        for op in Operation::ALL {
            assert_eq!(op.name().parse::<Operation>(), Ok(op));
            assert_eq!(op.to_string(), op.name());
        }
        assert_eq!(
            "Put".parse::<Operation>(),
            Err(PolicyError::UnknownOperation("Put".into()))
        );
        assert!("*".parse::<Operation>().is_err());
        assert_eq!("*".parse(), Ok(OperationPattern::Any));
    }

    #[test]
    fn caller_patterns_parse() {
        assert_eq!("owner".parse(), Ok(CallerPattern::Owner));
        assert_eq!("*".parse(), Ok(CallerPattern::Any));
        assert_eq!("uid:0".parse(), Ok(CallerPattern::Uid(0)));
        assert_eq!("uid:4294967295".parse(), Ok(CallerPattern::Uid(u32::MAX)));
        for bad in [
            "",
            "root",
            "uid:",
            "uid:-1",
            "uid:+1",
            "uid:4294967296",
            "uid: 1",
        ] {
            assert_eq!(
                bad.parse::<CallerPattern>(),
                Err(PolicyError::BadCaller(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(
            Caller::new(7, 7),
            Caller {
                uid: 7,
                is_owner: true
            }
        );
        assert!(!Caller::new(7, 8).is_owner);
    }

    #[test]
    fn scope_patterns_parse_and_display() {
        for (text, pattern) in [
            ("*", ScopePattern::Any),
            ("ci/*", ScopePattern::Prefix("ci/".into())),
            ("a/b/*", ScopePattern::Prefix("a/b/".into())),
            ("ci", ScopePattern::Exact("ci".into())),
            ("ci/deploy", ScopePattern::Exact("ci/deploy".into())),
        ] {
            assert_eq!(text.parse(), Ok(pattern.clone()));
            assert_eq!(pattern.to_string(), text);
        }
        for bad in ["", "ci*", "ci/*/x", "*/ci", "c*i", "**", "ci/**"] {
            assert_eq!(
                bad.parse::<ScopePattern>(),
                Err(PolicyError::BadScope(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn scope_globs_match() {
        let prefix: ScopePattern = "ci/*".parse().unwrap();
        assert!(prefix.matches("ci/deploy"));
        assert!(prefix.matches("ci/deploy/prod"));
        assert!(!prefix.matches("ci"));
        assert!(!prefix.matches("cix/deploy"));
        assert!(!prefix.matches("other/ci/deploy"));
        let exact: ScopePattern = "ci".parse().unwrap();
        assert!(exact.matches("ci"));
        assert!(!exact.matches("ci/deploy"));
        assert!(ScopePattern::Any.matches(""));
        assert!(ScopePattern::Any.matches("anything/at/all"));
    }

    #[test]
    fn no_rules_denies_everything() {
        let policy = Policy::new(Vec::new());
        for op in Operation::ALL {
            assert_eq!(
                decide(&policy, &OWNER, op, "x", &BTreeMap::new()),
                Decision::Deny(NO_RULE_ALLOWS.into())
            );
        }
    }

    #[test]
    fn owner_only_allows_the_owner_and_nobody_else() {
        let policy = Policy::owner_only();
        let none = BTreeMap::new();
        for op in Operation::ALL {
            assert_eq!(decide(&policy, &OWNER, op, "a/b", &none), Decision::Allow);
            assert_eq!(
                decide(&policy, &STRANGER, op, "a/b", &none),
                Decision::Deny(NO_RULE_ALLOWS.into())
            );
        }
    }

    #[test]
    fn explicit_deny_wins_whatever_the_order() {
        let allow = rule("allow", &["*"], &["*"], &["*"]);
        let deny = rule("deny", &["uid:4242"], &["resolve"], &["prod/*"]);
        for policy in [
            Policy::new(vec![allow.clone(), deny.clone()]),
            Policy::new(vec![deny.clone(), allow.clone()]),
        ] {
            let none = BTreeMap::new();
            let Decision::Deny(reason) =
                decide(&policy, &STRANGER, Operation::Resolve, "prod/db", &none)
            else {
                panic!("a matching deny rule must win");
            };
            assert!(reason.starts_with("denied by policy["), "{reason}");
            assert!(
                reason.contains("deny callers [uid:4242] operations [resolve] scopes [prod/*]"),
                "{reason}"
            );
            assert!(decide(&policy, &STRANGER, Operation::Resolve, "dev/db", &none).is_allowed());
            assert!(decide(&policy, &STRANGER, Operation::Describe, "prod/db", &none).is_allowed());
            assert!(decide(&policy, &OWNER, Operation::Resolve, "prod/db", &none).is_allowed());
        }
    }

    #[test]
    fn labels_must_all_be_present_and_equal() {
        let mut wanted = labels(&[("team", "infra"), ("env", "prod")]);
        let allow = Rule::new(
            Effect::Allow,
            vec![CallerPattern::Any],
            vec![OperationPattern::Any],
            vec![ScopePattern::Any],
            std::mem::take(&mut wanted),
        );
        let policy = Policy::new(vec![allow]);
        let op = Operation::Describe;
        let ok = labels(&[("team", "infra"), ("env", "prod"), ("extra", "x")]);
        assert!(decide(&policy, &STRANGER, op, "s", &ok).is_allowed());
        for bad in [
            labels(&[("team", "infra")]),
            labels(&[("team", "infra"), ("env", "dev")]),
            labels(&[("team", "INFRA"), ("env", "prod")]),
            BTreeMap::new(),
        ] {
            assert_eq!(
                decide(&policy, &STRANGER, op, "s", &bad),
                Decision::Deny(NO_RULE_ALLOWS.into()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn resolve_needs_a_purpose_even_for_the_owner() {
        let policy = Policy::owner_only();
        let none = BTreeMap::new();
        for purpose in [None, Some(""), Some("  \t\n")] {
            let req = Request {
                caller: &OWNER,
                operation: Operation::Resolve,
                scope: "s",
                labels: &none,
                purpose,
            };
            assert_eq!(
                policy.decide(&req),
                Decision::Deny(RESOLVE_NEEDS_PURPOSE.into()),
                "{purpose:?}"
            );
        }
        let req = Request {
            caller: &OWNER,
            operation: Operation::Describe,
            scope: "s",
            labels: &none,
            purpose: None,
        };
        assert!(
            policy.decide(&req).is_allowed(),
            "only resolve needs a purpose"
        );
    }

    #[test]
    fn operations_list_restricts_and_star_allows_all() {
        let policy = Policy::new(vec![rule(
            "allow",
            &["uid:4242"],
            &["describe", "list"],
            &["*"],
        )]);
        let none = BTreeMap::new();
        for op in Operation::ALL {
            let allowed = decide(&policy, &STRANGER, op, "s", &none).is_allowed();
            assert_eq!(
                allowed,
                matches!(op, Operation::Describe | Operation::List),
                "{op}"
            );
        }
        let star = Policy::new(vec![rule("allow", &["uid:4242"], &["*"], &["*"])]);
        for op in Operation::ALL {
            assert!(
                decide(&star, &STRANGER, op, "s", &none).is_allowed(),
                "{op}"
            );
        }
    }

    #[test]
    fn rule_display_summarises_it() {
        let mut r = rule("deny", &["owner", "uid:7"], &["put", "*"], &["ci/*", "x"]);
        r.labels = labels(&[("a", "1"), ("b", "2")]);
        assert_eq!(
            r.to_string(),
            "deny callers [owner, uid:7] operations [put, *] scopes [ci/*, x] labels {a=1, b=2}"
        );
    }
}
