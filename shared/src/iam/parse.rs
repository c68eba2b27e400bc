//! Parsing and validating `iam.toml`; every error names its line.
//!
//! Kind: pure.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::model::{Condition, Effect, NumOp, Pattern, Policy, Role, Statement};
use super::{Action, IamConfig, IamError, attr};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIam {
    version: Spanned<u32>,
    settings: Spanned<RawSettings>,
    #[serde(default, rename = "policy")]
    policies: Vec<Spanned<RawPolicy>>,
    #[serde(default, rename = "role")]
    roles: Vec<Spanned<RawRole>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    unpaired_role: Spanned<String>,
    initial_role: Spanned<String>,
    open_pairing_role: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    id: Spanned<String>,
    #[serde(default, rename = "statement")]
    statements: Vec<Spanned<RawStatement>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatement {
    effect: Spanned<String>,
    actions: Vec<Spanned<String>>,
    #[serde(default)]
    conditions: Vec<Spanned<BTreeMap<String, BTreeMap<String, toml::Value>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    id: Spanned<String>,
    policies: Vec<Spanned<String>>,
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map_or(1, |t| t.bytes().filter(|&b| b == b'\n').count() + 1)
}

impl IamConfig {
    /// Parses and validates `iam.toml` text.
    ///
    /// # Errors
    /// [`IamError`] with the line of the first problem.
    pub fn from_toml(text: &str, source: Option<PathBuf>) -> Result<Self, IamError> {
        let path = source.as_ref().map_or_else(
            || "built-in IAM defaults".to_string(),
            |p| p.display().to_string(),
        );
        let err = |offset: usize, message: String| IamError {
            path: path.clone(),
            message: format!("line {}: {message}", line_of(text, offset)),
        };
        let raw: RawIam = toml::from_str(text).map_err(|e| IamError {
            path: path.clone(),
            message: e.to_string().trim_end().to_string(),
        })?;
        if *raw.version.get_ref() != 1 {
            return Err(err(raw.version.span().start, "version must be 1".into()));
        }
        let mut policies = BTreeMap::new();
        for p in &raw.policies {
            let p = p.get_ref();
            let id = p.id.get_ref().clone();
            crate::config::check_id("policy id", &id).map_err(|e| err(p.id.span().start, e.0))?;
            let mut statements = Vec::new();
            for s in &p.statements {
                statements.push(Arc::new(parse_statement(text, s, &err)?));
            }
            if policies
                .insert(
                    id.clone(),
                    Policy {
                        id: id.into(),
                        statements,
                    },
                )
                .is_some()
            {
                return Err(err(
                    p.id.span().start,
                    format!("policy '{}' is defined twice", p.id.get_ref()),
                ));
            }
        }
        let roles = parse_roles(&raw.roles, &policies, &err)?;
        let settings = raw.settings.get_ref();
        for s in [
            &settings.unpaired_role,
            &settings.initial_role,
            &settings.open_pairing_role,
        ] {
            if !roles.iter().any(|r| &r.id == s.get_ref()) {
                return Err(err(
                    s.span().start,
                    format!("role '{}' is not defined", s.get_ref()),
                ));
            }
        }
        Ok(Self {
            policies,
            unpaired_role: settings.unpaired_role.get_ref().clone(),
            initial_role: settings.initial_role.get_ref().clone(),
            open_pairing_role: settings.open_pairing_role.get_ref().clone(),
            roles,
            source,
        })
    }
}

fn parse_roles(
    raw: &[Spanned<RawRole>],
    policies: &BTreeMap<String, Policy>,
    err: &impl Fn(usize, String) -> IamError,
) -> Result<Vec<Role>, IamError> {
    let mut roles: Vec<Role> = Vec::new();
    for r in raw {
        let r = r.get_ref();
        let id = r.id.get_ref().clone();
        crate::config::check_id("role id", &id).map_err(|e| err(r.id.span().start, e.0))?;
        if roles.iter().any(|x| x.id == id) {
            return Err(err(
                r.id.span().start,
                format!("role '{id}' is defined twice"),
            ));
        }
        let mut list = Vec::new();
        for p in &r.policies {
            if !policies.contains_key(p.get_ref()) {
                return Err(err(
                    p.span().start,
                    format!(
                        "role '{id}' uses policy '{}', which is not defined",
                        p.get_ref()
                    ),
                ));
            }
            list.push(p.get_ref().clone());
        }
        roles.push(Role { id, policies: list });
    }
    Ok(roles)
}

fn parse_statement(
    text: &str,
    s: &Spanned<RawStatement>,
    err: &impl Fn(usize, String) -> IamError,
) -> Result<Statement, IamError> {
    let line = line_of(text, s.span().start);
    let raw = s.get_ref();
    let effect = match raw.effect.get_ref().as_str() {
        "allow" | "Allow" => Effect::Allow,
        "deny" | "Deny" => Effect::Deny,
        other => {
            return Err(err(
                raw.effect.span().start,
                format!("effect must be \"allow\" or \"deny\", not \"{other}\""),
            ));
        }
    };
    if raw.actions.is_empty() {
        return Err(err(
            s.span().start,
            "a statement needs at least one action".into(),
        ));
    }
    let actions = raw
        .actions
        .iter()
        .map(|a| parse_pattern(a, err))
        .collect::<Result<Vec<_>, _>>()?;
    let mut conditions = Vec::new();
    for c in &raw.conditions {
        let at = c.span().start;
        for (op, map) in c.get_ref() {
            for (name, value) in map {
                let attr = attr::ALL.into_iter().find(|a| a == name).ok_or_else(|| {
                    err(
                        at,
                        format!(
                            "unknown attribute '{name}'; attributes are {}",
                            attr::ALL.join(", ")
                        ),
                    )
                })?;
                conditions.push(parse_condition(op, attr, value).map_err(|m| err(at, m))?);
            }
        }
    }
    let snippet = format!(
        "{} {}{}",
        match effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        },
        raw.actions
            .iter()
            .map(|a| a.get_ref().as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if conditions.is_empty() {
            String::new()
        } else {
            format!(" when {}", describe_conditions(&conditions))
        }
    );
    Ok(Statement {
        effect,
        actions,
        conditions,
        line,
        text: snippet,
    })
}

/// An action name, `Prefix:*` or `*`.
fn parse_pattern(
    a: &Spanned<String>,
    err: &impl Fn(usize, String) -> IamError,
) -> Result<Pattern, IamError> {
    let name = a.get_ref();
    if name == "*" {
        return Ok(Pattern::Any);
    }
    if let Some(prefix) = name.strip_suffix('*') {
        if !prefix.ends_with(':') || !Action::ALL.iter().any(|x| x.as_str().starts_with(prefix)) {
            return Err(err(a.span().start, format!("'{name}' matches no action")));
        }
        return Ok(Pattern::Prefix(prefix.to_string()));
    }
    name.parse()
        .map(Pattern::Exact)
        .map_err(|e: super::UnknownAction| {
            err(
                a.span().start,
                format!(
                    "{e}; actions are {}",
                    Action::ALL.map(Action::as_str).join(", ")
                ),
            )
        })
}

fn describe_conditions(conds: &[Condition]) -> String {
    conds
        .iter()
        .map(|c| match c {
            Condition::StringEquals(a, v) => format!("{a} is one of {v:?}"),
            Condition::StringNotEquals(a, v) => format!("{a} is none of {v:?}"),
            Condition::Bool(a, b) => format!("{a} = {b}"),
            Condition::Numeric(op, a, n) => format!("{a} {op:?} {n}"),
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

fn strings(value: &toml::Value) -> Result<Vec<String>, String> {
    match value {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "string conditions take strings".to_string())
            })
            .collect(),
        _ => Err("string conditions take a string or a non-empty list of strings".into()),
    }
}

fn parse_condition(op: &str, attr: &'static str, value: &toml::Value) -> Result<Condition, String> {
    let num = |v: &toml::Value| -> Result<f64, String> {
        match v {
            toml::Value::Integer(i) => Ok(*i as f64),
            toml::Value::Float(f) => Ok(*f),
            toml::Value::Array(a) if a.len() == 1 => match &a[0] {
                toml::Value::Integer(i) => Ok(*i as f64),
                toml::Value::Float(f) => Ok(*f),
                _ => Err("numeric conditions take a number".into()),
            },
            _ => Err("numeric conditions take a number".into()),
        }
    };
    Ok(match op {
        "StringEquals" => Condition::StringEquals(attr, strings(value)?),
        "StringNotEquals" => Condition::StringNotEquals(attr, strings(value)?),
        "Bool" => Condition::Bool(
            attr,
            match value {
                toml::Value::Boolean(b) => *b,
                toml::Value::Array(a) if a.len() == 1 && a[0].is_bool() => {
                    a[0].as_bool().unwrap_or(false)
                }
                toml::Value::String(s) if s == "true" || s == "false" => s == "true",
                _ => return Err("Bool conditions take true or false".into()),
            },
        ),
        "NumericEquals" => Condition::Numeric(NumOp::Eq, attr, num(value)?),
        "NumericNotEquals" => Condition::Numeric(NumOp::Ne, attr, num(value)?),
        "NumericLessThan" => Condition::Numeric(NumOp::Lt, attr, num(value)?),
        "NumericLessThanEquals" => Condition::Numeric(NumOp::Le, attr, num(value)?),
        "NumericGreaterThan" => Condition::Numeric(NumOp::Gt, attr, num(value)?),
        "NumericGreaterThanEquals" => Condition::Numeric(NumOp::Ge, attr, num(value)?),
        other => {
            return Err(format!(
                "unknown condition '{other}'; use StringEquals, StringNotEquals, Bool, \
                 NumericEquals, NumericNotEquals, NumericLessThan, NumericLessThanEquals, \
                 NumericGreaterThan or NumericGreaterThanEquals"
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iam::eval::substitute;
    use crate::iam::{Attrs, DEFAULT_IAM_TOML, Value};

    #[test]
    fn conditions() {
        let mut a = Attrs::new();
        a.insert(attr::TUNNEL_SERVICE_ID, Value::Str("cam-1".into()));
        a.insert(attr::CONNECTION_USERNAME, Value::Str("bob".into()));
        a.insert(attr::IAM_USERNAME, Value::Str("bob".into()));
        a.insert(attr::IAM_ROLE_ID, Value::Num(3.0));
        let c = |op: &str, name: &'static str, v: toml::Value| {
            parse_condition(op, name, &v).unwrap().holds(&a)
        };
        let s = |x: &str| toml::Value::String(x.into());
        assert!(c("StringEquals", attr::TUNNEL_SERVICE_ID, s("cam-1")));
        assert!(c(
            "StringEquals",
            attr::TUNNEL_SERVICE_ID,
            toml::Value::Array(vec![s("x"), s("cam-1")])
        ));
        assert!(!c("StringNotEquals", attr::TUNNEL_SERVICE_ID, s("cam-1")));
        assert!(c("StringNotEquals", attr::TUNNEL_SERVICE_ID, s("cam-2")));
        assert!(c(
            "StringEquals",
            attr::IAM_USERNAME,
            s("${Connection:Username}")
        ));
        assert!(!c(
            "StringEquals",
            attr::TUNNEL_SERVICE_ID,
            s("cam-${IAM:RoleId}")
        ));
        assert!(!c(
            "StringEquals",
            attr::IAM_USERNAME,
            s("${Connection:Fingerprint}")
        ));
        assert!(!c("StringEquals", attr::TUNNEL_SERVICE_TYPE, s("x")));
        assert!(!c("StringNotEquals", attr::TUNNEL_SERVICE_TYPE, s("x")));
        assert!(c(
            "NumericLessThan",
            attr::IAM_ROLE_ID,
            toml::Value::Integer(4)
        ));
        assert!(!c(
            "NumericGreaterThan",
            attr::IAM_ROLE_ID,
            toml::Value::Integer(4)
        ));
        assert!(c(
            "NumericEquals",
            attr::IAM_ROLE_ID,
            toml::Value::Float(3.0)
        ));
        assert!(!c(
            "Bool",
            attr::CONNECTION_IS_LOCAL,
            toml::Value::Boolean(true)
        ));
        assert_eq!(
            substitute("a${IAM:Username}b", &a).as_deref(),
            Some("abobb")
        );
        assert_eq!(substitute("${nope}", &a), None);
        assert_eq!(substitute("${unterminated", &a), None);
    }

    #[test]
    fn errors_name_the_line() {
        let base = DEFAULT_IAM_TOML;
        let cases: &[(&str, &str, &str)] = &[
            (
                "actions = [\"Pairing:*\"]",
                "actions = [\"Pairing:Teleport\"]",
                "line 15: unknown action 'Pairing:Teleport'",
            ),
            (
                "actions = [\"Pairing:*\"]",
                "actions = [\"Nope:*\"]",
                "line 15: 'Nope:*' matches no action",
            ),
            (
                "effect = \"allow\"\nactions = [\"Pairing:*\"]",
                "effect = \"maybe\"\nactions = [\"Pairing:*\"]",
                "line 14: effect must be",
            ),
            (
                "policies = [\"Tunnel\", \"ManageAll\"]",
                "policies = [\"Tunnel\", \"ManageAl\"]",
                "policy 'ManageAl', which is not defined",
            ),
            (
                "open_pairing_role = \"Guest\"",
                "open_pairing_role = \"Visitor\"",
                "line 9: role 'Visitor' is not defined",
            ),
            (
                "{ Bool = { \"Connection:IsLocal\" = true } }",
                "{ Bool = { \"Connection:IsRemote\" = true } }",
                "unknown attribute 'Connection:IsRemote'",
            ),
            (
                "{ Bool = { \"Connection:IsLocal\" = true } }",
                "{ Maybe = { \"Connection:IsLocal\" = true } }",
                "unknown condition 'Maybe'",
            ),
            ("version = 1", "version = 2", "line 4: version must be 1"),
            (
                "id = \"Guest\"",
                "id = \"Guest\"\nextra = 1",
                "unknown field `extra`",
            ),
        ];
        for (from, to, needle) in cases {
            assert!(base.contains(from), "{from}");
            let text = base.replacen(from, to, 1);
            let e = IamConfig::from_toml(&text, Some("iam.toml".into())).unwrap_err();
            assert!(e.to_string().contains(needle), "{to}: {e}");
            assert!(e.to_string().starts_with("iam.toml: "), "{e}");
        }
    }
}
