//! Application Gateway v2 rewrite-rule evaluator.
//!
//! Loads the same `rewriteRules` JSON that `infra/` hands to Application Gateway
//! (`infra/rewrite-rules.json`, read by the Bicep with `loadJsonContent`) and applies it the way
//! the gateway does, so tests and the local gateway emulator exercise the real rules instead of
//! a copy of them.
//!
//! # Semantics (Application Gateway v2, as documented)
//! - Rules run in ascending `ruleSequence` order (ties keep file order). **Every** rule whose
//!   conditions hold applies; evaluation does not stop at the first match. Conditions read the
//!   *original* request: the docs say `uri_path` "refers to the original URL path, prior to any
//!   manipulation", so a later rule never sees an earlier rule's rewrite. When two rules set the
//!   same URL component, the later one wins. Our rule set is written so that at most one rule
//!   can match any request and no rule matches a rewritten path, which makes the result the
//!   same under any reading of those details; `tests/it/rewrite_rules.rs` proves both properties.
//! - A rule applies when all of its conditions hold (logical AND). A condition holds when its
//!   RE2 pattern matches the variable (`ignoreCase` → case-insensitive), inverted by `negate`.
//!   Patterns are searched, not implicitly anchored: write `^…$` to match a whole value.
//! - Server variables: `var_uri_path`, `var_query_string` and its twin `var_request_query`
//!   (the query without `?`), `var_request_uri` (path plus `?query`), `var_host`.
//! - Action values may use `{var_<name>}` (the whole variable) and `{var_<name>_<n>}` (capture
//!   group `n` of the condition on that variable; the case of `<name>` must match the
//!   condition's variable). A negated condition captures nothing. A group that did not take
//!   part in the match is empty.
//! - `urlConfiguration.modifiedPath` / `modifiedQueryString`: `null` leaves that component
//!   unchanged (the ARM schema: "Null means no path/query string will be updated"). An empty
//!   `modifiedQueryString` **removes** the query: that is what Terraform and AGIC users hit when
//!   their tools sent `""`, so our rules keep `null` to pass the whole query through.
//! - `reroute` (re-evaluate the URL path map) is recorded but there are no path maps here; it is
//!   not allowed on the Basic routing rule our gateway uses anyway.
//!
//! Header actions are parsed (so the schema round-trips) but not applied: the evaluator answers
//! "which URL reaches the backend". Regexes compile once in [`RewriteRules::from_json`], so the
//! emulator can call [`RewriteRules::rewrite`] per request.
//!
//! The Rust `regex` crate implements the same family of syntax as RE2 (no look-around, no
//! back-references); a pattern that compiles here and uses only RE2 syntax behaves the same.

use std::fmt;

use regex::{Captures, Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

/// The rules AppGW is deployed with, compiled into this crate.
pub const DEFAULT_RULES_JSON: &str = include_str!("../../infra/rewrite-rules.json");

/// One entry of `rewriteRuleSets[].properties.rewriteRules`, exactly as in the ARM schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteRule {
    pub name: String,
    pub rule_sequence: i32,
    #[serde(default)]
    pub conditions: Vec<RewriteRuleCondition>,
    pub action_set: RewriteRuleActionSet,
}

/// `rewriteRules[].conditions[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteRuleCondition {
    pub variable: String,
    pub pattern: String,
    #[serde(default)]
    pub ignore_case: bool,
    #[serde(default)]
    pub negate: bool,
}

/// `rewriteRules[].actionSet`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteRuleActionSet {
    #[serde(default)]
    pub request_header_configurations: Vec<HeaderConfiguration>,
    #[serde(default)]
    pub response_header_configurations: Vec<HeaderConfiguration>,
    #[serde(default)]
    pub url_configuration: Option<UrlConfiguration>,
}

/// `actionSet.requestHeaderConfigurations[]` / `responseHeaderConfigurations[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderConfiguration {
    pub header_name: String,
    #[serde(default)]
    pub header_value: Option<String>,
    #[serde(default)]
    pub header_value_matcher: Option<serde_json::Value>,
}

/// `actionSet.urlConfiguration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlConfiguration {
    /// `None` (JSON `null` or absent): the path is left as it is.
    #[serde(default)]
    pub modified_path: Option<String>,
    /// `None`: the query is left as it is. `Some("")`: the query is removed.
    #[serde(default)]
    pub modified_query_string: Option<String>,
    #[serde(default)]
    pub reroute: bool,
}

/// Why a rules document was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesError {
    /// Not JSON, or not the `rewriteRules` schema.
    Json(String),
    /// A condition names a variable this evaluator cannot supply.
    UnsupportedVariable { rule: String, variable: String },
    /// A condition pattern does not compile.
    Pattern {
        rule: String,
        pattern: String,
        error: String,
    },
    /// An action value references something that does not exist or is not supported.
    Placeholder {
        rule: String,
        placeholder: String,
        reason: String,
    },
    /// Two rules share a name.
    DuplicateName(String),
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RulesError::Json(e) => write!(f, "rewrite rules: invalid document: {e}"),
            RulesError::UnsupportedVariable { rule, variable } => write!(
                f,
                "rewrite rule {rule:?}: unsupported condition variable {variable:?} \
                 (supported: var_uri_path, var_query_string, var_request_query, \
                 var_request_uri, var_host)"
            ),
            RulesError::Pattern {
                rule,
                pattern,
                error,
            } => write!(f, "rewrite rule {rule:?}: pattern {pattern:?}: {error}"),
            RulesError::Placeholder {
                rule,
                placeholder,
                reason,
            } => write!(f, "rewrite rule {rule:?}: {{{placeholder}}}: {reason}"),
            RulesError::DuplicateName(name) => {
                write!(f, "rewrite rules: the name {name:?} is used twice")
            }
        }
    }
}

impl std::error::Error for RulesError {}

/// The server variables a condition or action value can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variable {
    UriPath,
    QueryString,
    RequestUri,
    Host,
}

impl Variable {
    /// Name without the `var_` prefix, as AppGW spells it.
    fn parse(name: &str) -> Option<Self> {
        match name {
            "uri_path" => Some(Variable::UriPath),
            "query_string" | "request_query" => Some(Variable::QueryString),
            "request_uri" => Some(Variable::RequestUri),
            "host" => Some(Variable::Host),
            _ => None,
        }
    }
}

/// The variable values of one request, computed once per [`RewriteRules::rewrite`].
struct Vars<'a> {
    path: &'a str,
    query: &'a str,
    request_uri: String,
    host: &'a str,
}

impl<'a> Vars<'a> {
    fn new(path: &'a str, query: Option<&'a str>, host: &'a str) -> Self {
        let request_uri = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        Vars {
            path,
            query: query.unwrap_or(""),
            request_uri,
            host,
        }
    }

    fn get(&self, v: Variable) -> &str {
        match v {
            Variable::UriPath => self.path,
            Variable::QueryString => self.query,
            Variable::RequestUri => &self.request_uri,
            Variable::Host => self.host,
        }
    }
}

#[derive(Debug)]
struct CompiledCondition {
    variable: Variable,
    regex: Regex,
    negate: bool,
}

#[derive(Debug)]
enum Part {
    Literal(String),
    Whole(Variable),
    /// Group `group` of condition `condition` of the same rule.
    Capture {
        condition: usize,
        group: usize,
    },
}

#[derive(Debug)]
struct Template(Vec<Part>);

impl Template {
    /// Parse `{var_…}` placeholders against the rule's conditions.
    fn parse(
        text: &str,
        rule: &RewriteRule,
        conditions: &[CompiledCondition],
    ) -> Result<Self, RulesError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let Some(close_rel) = rest[open..].find('}') else {
                break;
            };
            let close = open + close_rel;
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let inner = &rest[open + 1..close];
            parts.push(Self::placeholder(inner, rule, conditions)?);
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template(parts))
    }

    fn placeholder(
        inner: &str,
        rule: &RewriteRule,
        conditions: &[CompiledCondition],
    ) -> Result<Part, RulesError> {
        let err = |reason: &str| RulesError::Placeholder {
            rule: rule.name.clone(),
            placeholder: inner.to_string(),
            reason: reason.to_string(),
        };
        let Some(name) = inner.strip_prefix("var_") else {
            return Err(err(
                "only server variables ({var_…}) are supported by this evaluator",
            ));
        };
        if let Some(v) = Variable::parse(name) {
            return Ok(Part::Whole(v));
        }
        // `{var_<name>_<n>}`: capture group n of the (last non-negated) condition on var_<name>.
        let Some((var_name, group)) = name.rsplit_once('_') else {
            return Err(err("unknown server variable"));
        };
        let Ok(group) = group.parse::<usize>() else {
            return Err(err("unknown server variable"));
        };
        if Variable::parse(var_name).is_none() {
            return Err(err("unknown server variable"));
        }
        let wanted = format!("var_{var_name}");
        let condition = rule
            .conditions
            .iter()
            .enumerate()
            .rev()
            .find(|(_, c)| c.variable == wanted && !c.negate)
            .map(|(i, _)| i)
            .ok_or_else(|| err("no non-negated condition on that variable captures it"))?;
        if group == 0 || group >= conditions[condition].regex.captures_len() {
            return Err(err("the condition's pattern has no such capture group"));
        }
        Ok(Part::Capture { condition, group })
    }

    fn render(&self, vars: &Vars<'_>, captures: &[Option<Captures<'_>>]) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Whole(v) => out.push_str(vars.get(*v)),
                Part::Capture { condition, group } => {
                    if let Some(m) = captures[*condition].as_ref().and_then(|c| c.get(*group)) {
                        out.push_str(m.as_str());
                    }
                }
            }
        }
        out
    }
}

#[derive(Debug)]
struct CompiledRule {
    rule: RewriteRule,
    conditions: Vec<CompiledCondition>,
    path: Option<Template>,
    query: Option<Template>,
}

impl CompiledRule {
    fn compile(rule: RewriteRule) -> Result<Self, RulesError> {
        let mut conditions = Vec::with_capacity(rule.conditions.len());
        for c in &rule.conditions {
            let variable = c
                .variable
                .strip_prefix("var_")
                .and_then(Variable::parse)
                .ok_or_else(|| RulesError::UnsupportedVariable {
                    rule: rule.name.clone(),
                    variable: c.variable.clone(),
                })?;
            let regex = RegexBuilder::new(&c.pattern)
                .case_insensitive(c.ignore_case)
                .build()
                .map_err(|e| RulesError::Pattern {
                    rule: rule.name.clone(),
                    pattern: c.pattern.clone(),
                    error: e.to_string(),
                })?;
            conditions.push(CompiledCondition {
                variable,
                regex,
                negate: c.negate,
            });
        }
        let url = rule.action_set.url_configuration.as_ref();
        let path = url
            .and_then(|u| u.modified_path.as_deref())
            .map(|t| Template::parse(t, &rule, &conditions))
            .transpose()?;
        let query = url
            .and_then(|u| u.modified_query_string.as_deref())
            .map(|t| Template::parse(t, &rule, &conditions))
            .transpose()?;
        Ok(CompiledRule {
            rule,
            conditions,
            path,
            query,
        })
    }

    /// `Some(captures per condition)` when every condition holds.
    fn matches<'v>(&self, vars: &'v Vars<'_>) -> Option<Vec<Option<Captures<'v>>>> {
        let mut all = Vec::with_capacity(self.conditions.len());
        for c in &self.conditions {
            let caps = c.regex.captures(vars.get(c.variable));
            if caps.is_some() == c.negate {
                return None;
            }
            all.push(if c.negate { None } else { caps });
        }
        Some(all)
    }
}

/// A compiled rewrite rule set.
#[derive(Debug)]
pub struct RewriteRules {
    /// Sorted by `ruleSequence`, ties in file order.
    rules: Vec<CompiledRule>,
}

/// The URL the backend receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// Path sent to the backend (unchanged when no rule set it).
    pub path: String,
    /// Query sent to the backend, without `?`; `None` when there is none.
    pub query: Option<String>,
    /// The first rule (in sequence order) that applied, if any.
    pub rule: Option<String>,
    /// Every rule that applied, in the order applied.
    pub applied: Vec<String>,
}

impl Rewritten {
    /// Path and query as one request target (`/path?query`).
    pub fn uri(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

impl RewriteRules {
    /// Parse and compile a rules document: either `{"rewriteRules": [...]}` or the bare array.
    pub fn from_json(json: &str) -> Result<Self, RulesError> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| RulesError::Json(e.to_string()))?;
        let array = match value {
            serde_json::Value::Array(_) => value,
            serde_json::Value::Object(mut map) => map
                .remove("rewriteRules")
                .ok_or_else(|| RulesError::Json("no \"rewriteRules\" member".into()))?,
            _ => return Err(RulesError::Json("expected an object or an array".into())),
        };
        let rules: Vec<RewriteRule> =
            serde_json::from_value(array).map_err(|e| RulesError::Json(e.to_string()))?;
        Self::from_rules(rules)
    }

    /// Compile rules already in memory.
    pub fn from_rules(rules: Vec<RewriteRule>) -> Result<Self, RulesError> {
        let mut seen = std::collections::HashSet::new();
        for r in &rules {
            if !seen.insert(r.name.clone()) {
                return Err(RulesError::DuplicateName(r.name.clone()));
            }
        }
        let mut compiled = rules
            .into_iter()
            .map(CompiledRule::compile)
            .collect::<Result<Vec<_>, _>>()?;
        // Stable sort: equal sequences keep their order in the file.
        compiled.sort_by_key(|r| r.rule.rule_sequence);
        Ok(RewriteRules { rules: compiled })
    }

    /// The rules deployed to Application Gateway (`infra/rewrite-rules.json`).
    pub fn load_default() -> Result<Self, RulesError> {
        Self::from_json(DEFAULT_RULES_JSON)
    }

    /// The declarative rules in evaluation order.
    pub fn rules(&self) -> impl Iterator<Item = &RewriteRule> {
        self.rules.iter().map(|r| &r.rule)
    }

    /// Names of the rules whose conditions hold for this request, in evaluation order.
    pub fn matching(&self, path: &str, query: Option<&str>, host: &str) -> Vec<&str> {
        let vars = Vars::new(path, query, host);
        self.rules
            .iter()
            .filter(|r| r.matches(&vars).is_some())
            .map(|r| r.rule.name.as_str())
            .collect()
    }

    /// Apply the rule set to one request. `query` is the raw query without `?`.
    pub fn rewrite(&self, path: &str, query: Option<&str>, host: &str) -> Rewritten {
        let vars = Vars::new(path, query, host);
        let mut out = Rewritten {
            path: path.to_string(),
            query: query.map(str::to_string),
            rule: None,
            applied: Vec::new(),
        };
        for r in &self.rules {
            let Some(captures) = r.matches(&vars) else {
                continue;
            };
            if let Some(t) = &r.path {
                out.path = t.render(&vars, &captures);
            }
            if let Some(t) = &r.query {
                let q = t.render(&vars, &captures);
                out.query = (!q.is_empty()).then_some(q);
            }
            out.rule.get_or_insert_with(|| r.rule.name.clone());
            out.applied.push(r.rule.name.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, seq: i32, conditions: &str, url: &str) -> String {
        format!(
            r#"{{"name":"{name}","ruleSequence":{seq},"conditions":[{conditions}],
               "actionSet":{{"requestHeaderConfigurations":[],"responseHeaderConfigurations":[],
               "urlConfiguration":{url}}}}}"#
        )
    }

    fn cond(var: &str, pattern: &str, ignore_case: bool, negate: bool) -> String {
        format!(
            r#"{{"variable":"{var}","pattern":"{pattern}","ignoreCase":{ignore_case},"negate":{negate}}}"#
        )
    }

    fn rules(items: &[String]) -> RewriteRules {
        RewriteRules::from_json(&format!(r#"{{"rewriteRules":[{}]}}"#, items.join(",")))
            .expect("rules compile")
    }

    #[test]
    fn default_rules_load() {
        let r = RewriteRules::load_default().unwrap();
        let seqs: Vec<i32> = r.rules().map(|r| r.rule_sequence).collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, sorted);
        assert!(r.rules().count() >= 5);
    }

    #[test]
    fn captures_and_null_query_keep_the_query() {
        let r = rules(&[rule(
            "a",
            1,
            &cond("var_uri_path", "^/x/([a-z]+)/(\\\\d+)$", false, false),
            r#"{"modifiedPath":"/y/{var_uri_path_2}/{var_uri_path_1}","modifiedQueryString":null,"reroute":false}"#,
        )]);
        let out = r.rewrite("/x/abc/42", Some("k=v&k=w"), "h");
        assert_eq!(out.path, "/y/42/abc");
        assert_eq!(out.query.as_deref(), Some("k=v&k=w"));
        assert_eq!(out.rule.as_deref(), Some("a"));
        assert_eq!(out.uri(), "/y/42/abc?k=v&k=w");
    }

    #[test]
    fn empty_query_string_removes_the_query() {
        let r = rules(&[rule(
            "a",
            1,
            &cond("var_uri_path", "^/x$", false, false),
            r#"{"modifiedPath":"/y","modifiedQueryString":""}"#,
        )]);
        let out = r.rewrite("/x", Some("a=1"), "h");
        assert_eq!(out.uri(), "/y");
    }

    #[test]
    fn query_template_uses_whole_variables() {
        let r = rules(&[rule(
            "a",
            1,
            &cond("var_uri_path", "^/(.+)/(.+)$", false, false),
            r#"{"modifiedPath":"/buy.aspx","modifiedQueryString":"category={var_uri_path_1}&product={var_uri_path_2}&{var_query_string}"}"#,
        )]);
        let out = r.rewrite("/fashion/shirts", Some("ref=1"), "h");
        assert_eq!(out.uri(), "/buy.aspx?category=fashion&product=shirts&ref=1");
    }

    #[test]
    fn ignore_case_and_negate() {
        let r = rules(&[rule(
            "a",
            1,
            &[
                cond("var_uri_path", "^/OpenAI/(.*)$", true, false),
                cond("var_host", "^internal\\\\.", false, true),
            ]
            .join(","),
            r#"{"modifiedPath":"/api/{var_uri_path_1}"}"#,
        )]);
        assert_eq!(
            r.rewrite("/openai/x", None, "public.example").path,
            "/api/x"
        );
        // The negated host condition fails, so the rule does not apply.
        assert_eq!(
            r.rewrite("/openai/x", None, "internal.example").path,
            "/openai/x"
        );
        assert_eq!(r.rewrite("/other", None, "public.example").rule, None);
    }

    #[test]
    fn conditions_are_anded_and_query_variables_work() {
        let r = rules(&[rule(
            "a",
            1,
            &[
                cond("var_uri_path", "^/p$", false, false),
                cond(
                    "var_query_string",
                    "(^|&)mode=(fast|slow)(&|$)",
                    false,
                    false,
                ),
                cond("var_request_uri", "^/p\\\\?", false, false),
            ]
            .join(","),
            r#"{"modifiedPath":"/{var_query_string_2}"}"#,
        )]);
        assert_eq!(r.rewrite("/p", Some("x=1&mode=slow"), "h").path, "/slow");
        assert_eq!(r.rewrite("/p", Some("mode=other"), "h").path, "/p");
        assert_eq!(r.rewrite("/p", None, "h").path, "/p");
    }

    #[test]
    fn all_matching_rules_apply_in_sequence_on_original_values() {
        let r = rules(&[
            rule(
                "second",
                20,
                &cond("var_uri_path", "^/a$", false, false),
                r#"{"modifiedQueryString":"from=second"}"#,
            ),
            rule(
                "first",
                10,
                &cond("var_uri_path", "^/a$", false, false),
                r#"{"modifiedPath":"/b","modifiedQueryString":"from=first"}"#,
            ),
            // Would match only if conditions saw the rewritten path: they do not.
            rule(
                "third",
                30,
                &cond("var_uri_path", "^/b$", false, false),
                r#"{"modifiedPath":"/c"}"#,
            ),
        ]);
        let out = r.rewrite("/a", None, "h");
        assert_eq!(out.uri(), "/b?from=second");
        assert_eq!(out.rule.as_deref(), Some("first"));
        assert_eq!(out.applied, vec!["first", "second"]);
        assert_eq!(r.matching("/a", None, "h"), vec!["first", "second"]);
    }

    #[test]
    fn rejects_bad_documents() {
        let bad_var = format!(
            r#"[{}]"#,
            rule(
                "a",
                1,
                &cond("http_req_Host", "x", false, false),
                r#"{"modifiedPath":"/"}"#
            )
        );
        assert!(matches!(
            RewriteRules::from_json(&bad_var),
            Err(RulesError::UnsupportedVariable { .. })
        ));
        let bad_group = format!(
            r#"[{}]"#,
            rule(
                "a",
                1,
                &cond("var_uri_path", "^/(x)$", false, false),
                r#"{"modifiedPath":"/{var_uri_path_2}"}"#
            )
        );
        assert!(matches!(
            RewriteRules::from_json(&bad_group),
            Err(RulesError::Placeholder { .. })
        ));
        let negated_capture = format!(
            r#"[{}]"#,
            rule(
                "a",
                1,
                &cond("var_uri_path", "^/(x)$", false, true),
                r#"{"modifiedPath":"/{var_uri_path_1}"}"#
            )
        );
        assert!(RewriteRules::from_json(&negated_capture).is_err());
        let bad_regex = format!(
            r#"[{}]"#,
            rule(
                "a",
                1,
                &cond("var_uri_path", "(", false, false),
                r#"{"modifiedPath":"/"}"#
            )
        );
        assert!(matches!(
            RewriteRules::from_json(&bad_regex),
            Err(RulesError::Pattern { .. })
        ));
        let dup = format!(
            r#"[{0},{0}]"#,
            rule("a", 1, &cond("var_uri_path", "x", false, false), "null")
        );
        assert_eq!(
            RewriteRules::from_json(&dup).unwrap_err(),
            RulesError::DuplicateName("a".into())
        );
        assert!(RewriteRules::from_json(r#"{"rules":[]}"#).is_err());
        assert!(RewriteRules::from_json(
            r#"[{"name":"a","ruleSequence":1,"actionSet":{},"extra":1}]"#
        )
        .is_err());
    }

    #[test]
    fn schema_round_trips() {
        let doc: serde_json::Value = serde_json::from_str(DEFAULT_RULES_JSON).unwrap();
        let parsed: Vec<RewriteRule> = serde_json::from_value(doc["rewriteRules"].clone()).unwrap();
        let back = serde_json::to_value(&parsed).unwrap();
        assert_eq!(back, doc["rewriteRules"]);
    }
}
