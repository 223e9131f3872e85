//! Per-service policy: which users, routes and connect flows a caller may act on.
//!
//! Patterns are parsed once at config time so that matching on the hot path is a walk over
//! pre-split segments without allocation.

use http::Method;

use super::config::ServiceFile;
use super::rate::RateLimiter;
use super::{AuthError, Caller};
use crate::store::ConnectionKey;

/// Which end users a service may act for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UserRule {
    /// Every user.
    Any,
    /// The named token claim must equal the requested user id.
    Claim(String),
    /// Exactly this user id.
    Exact(String),
    /// Any user id starting with this prefix (`"team-a-*"` in config).
    Prefix(String),
}

impl UserRule {
    fn parse(text: &str) -> Result<UserRule, String> {
        if text == "any" {
            return Ok(UserRule::Any);
        }
        if let Some(claim) = text.strip_prefix("claim:") {
            if claim.is_empty() {
                return Err("\"claim:\" needs a claim name, e.g. \"claim:sub\"".into());
            }
            return Ok(UserRule::Claim(claim.to_owned()));
        }
        if text.is_empty() {
            return Err("empty user id".into());
        }
        let (body, is_prefix) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if body.contains('*') {
            return Err(format!(
                "user pattern {text:?}: '*' is only allowed at the end (use \"any\" for all users)"
            ));
        }
        if body.is_empty() {
            return Err("user pattern \"*\": write \"any\" to allow all users".into());
        }
        Ok(if is_prefix {
            UserRule::Prefix(body.to_owned())
        } else {
            UserRule::Exact(body.to_owned())
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: any remainder, including nothing.
    Rest,
}

/// `METHOD /path/pattern`, matched against the path as sent (the gateway has already refused
/// ambiguous spellings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoutePattern {
    /// `None` matches any method.
    method: Option<Method>,
    segments: Vec<Segment>,
}

impl RoutePattern {
    fn parse(text: &str) -> Result<RoutePattern, String> {
        let mut parts = text.split_whitespace();
        let (Some(method_text), Some(path), None) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "route {text:?} must be \"METHOD /path\", e.g. \"GET /rest/**\""
            ));
        };
        let method = if method_text == "*" {
            None
        } else {
            if method_text.bytes().any(|b| !b.is_ascii_uppercase()) {
                return Err(format!(
                    "route {text:?}: method must be upper-case, e.g. GET, or *"
                ));
            }
            Some(
                Method::from_bytes(method_text.as_bytes())
                    .map_err(|_| format!("route {text:?}: invalid method"))?,
            )
        };
        let Some(rest) = path.strip_prefix('/') else {
            return Err(format!("route {text:?}: path must start with '/'"));
        };
        let mut segments = Vec::new();
        let pieces: Vec<&str> = rest.split('/').collect();
        for (index, piece) in pieces.iter().enumerate() {
            let segment = match *piece {
                "**" if index + 1 == pieces.len() => Segment::Rest,
                "**" => return Err(format!("route {text:?}: '**' must be the last segment")),
                "*" => Segment::One,
                literal if literal.contains('*') => {
                    return Err(format!(
                        "route {text:?}: '*' must be a whole segment ('*' or '**')"
                    ))
                }
                literal => Segment::Literal(literal.to_owned()),
            };
            segments.push(segment);
        }
        Ok(RoutePattern { method, segments })
    }

    /// Whether `method` and `path` (a request's path, without its query: the proxy splits the
    /// target once, in `proxy::routes::split_target`) match this pattern.
    fn matches(&self, method: &Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut pieces = rest.split('/');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::One => match pieces.next() {
                    Some(piece) if !piece.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(literal) => match pieces.next() {
                    Some(piece) if piece == literal => {}
                    _ => return false,
                },
            }
        }
        pieces.next().is_none()
    }
}

/// Parses every entry, reporting each failure with its config location.
fn parse_each<T>(
    texts: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
    context: &str,
    field: &str,
    errors: &mut Vec<String>,
) -> Vec<T> {
    texts
        .iter()
        .filter_map(|text| {
            parse(text)
                .map_err(|err| errors.push(format!("{context}: {field}: {err}")))
                .ok()
        })
        .collect()
}

/// The validated policy of one calling service.
#[derive(Debug)]
pub(crate) struct ServicePolicy {
    pub(crate) name: String,
    pub(crate) issuer: String,
    pub(crate) subject: String,
    pub(crate) subject_claim: String,
    /// `None`: any configured key may authenticate this service.
    pub(crate) keys: Option<Vec<String>>,
    pub(crate) users: Vec<UserRule>,
    pub(crate) routes: Vec<RoutePattern>,
    pub(crate) flows: Vec<String>,
    pub(crate) rate_limiter: Option<RateLimiter>,
}

impl ServicePolicy {
    /// Validates one service entry, pushing every problem to `errors`.
    pub(crate) fn from_file(file: &ServiceFile, errors: &mut Vec<String>) -> Option<Self> {
        let before = errors.len();
        let context = format!("callers.services {:?}", file.name);
        // The name owns the service's one-time connections (`flow:<name>/<flow id>`), so it
        // must be an id: a name no key can carry would break every flow after the consent.
        if let Err(invalid) = ConnectionKey::flow(&file.name, "flow") {
            errors.push(format!("{context}: name: {invalid}"));
        }
        if file.issuer.is_empty() {
            errors.push(format!("{context}: issuer is empty"));
        }
        if file.subject.is_empty() {
            errors.push(format!("{context}: subject is empty"));
        }
        if file.subject_claim.as_deref() == Some("") {
            errors.push(format!("{context}: subject_claim is empty"));
        }
        if file.connections.is_empty() {
            errors.push(format!(
                "{context}: connections is empty; write [\"any\"], [\"claim:sub\"] or user ids"
            ));
        }
        let users = parse_each(
            &file.connections,
            UserRule::parse,
            &context,
            "connections",
            errors,
        );
        let routes = parse_each(
            &file.routes,
            RoutePattern::parse,
            &context,
            "routes",
            errors,
        );
        if file.routes.is_empty() {
            errors.push(format!(
                "{context}: routes is empty; the service could not call anything"
            ));
        }
        for flow in &file.flows {
            let valid = !flow.is_empty()
                && flow
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/-_".contains(&b));
            if !valid {
                errors.push(format!("{context}: flows: invalid flow name {flow:?}"));
            }
        }
        let rate_limiter = match &file.rate_limit {
            Some(limit) => {
                let burst = limit.burst.unwrap_or(limit.per_second);
                if limit.per_second == 0 || burst == 0 {
                    errors.push(format!(
                        "{context}: rate_limit per_second and burst must be at least 1"
                    ));
                    None
                } else {
                    Some(RateLimiter::new(limit.per_second, burst))
                }
            }
            None => None,
        };
        if errors.len() > before {
            return None;
        }
        Some(ServicePolicy {
            name: file.name.clone(),
            issuer: file.issuer.clone(),
            subject: file.subject.clone(),
            subject_claim: file
                .subject_claim
                .clone()
                .unwrap_or_else(|| "sub".to_owned()),
            keys: file.keys.clone(),
            users,
            routes,
            flows: file.flows.clone(),
            rate_limiter,
        })
    }

    pub(crate) fn allows_route(&self, method: &Method, path: &str) -> bool {
        self.routes.iter().any(|route| route.matches(method, path))
    }

    pub(crate) fn allows_flow(&self, flow: &str) -> bool {
        self.flows.iter().any(|allowed| allowed == flow)
    }

    pub(crate) fn allows_key(&self, kid: &str) -> bool {
        self.keys
            .as_ref()
            .is_none_or(|keys| keys.iter().any(|k| k == kid))
    }
}

impl Caller {
    /// Allows `method` on `path` as sent (percent-encoding kept, without query) if a route
    /// pattern matches; a path that would only match once decoded does not (fail closed).
    pub fn authorize_route(&self, method: &Method, path: &str) -> Result<(), AuthError> {
        if self.policy.allows_route(method, path) {
            Ok(())
        } else {
            Err(AuthError::forbidden("route not allowed"))
        }
    }

    /// Allows acting for `user_id` per the policy's `connections`.
    pub fn authorize_user(&self, user_id: &str) -> Result<(), AuthError> {
        let allowed = !user_id.is_empty()
            && self.policy.users.iter().any(|rule| match rule {
                UserRule::Any => true,
                UserRule::Exact(id) => id == user_id,
                UserRule::Prefix(prefix) => user_id.starts_with(prefix.as_str()),
                UserRule::Claim(name) => self.claim(name) == Some(user_id),
            });
        if allowed {
            Ok(())
        } else {
            Err(AuthError::forbidden("user not allowed"))
        }
    }

    /// Allows starting the connect flow `flow_kind` (e.g. `"ongoing/access"`).
    pub fn authorize_flow(&self, flow_kind: &str) -> Result<(), AuthError> {
        if self.policy.allows_flow(flow_kind) {
            Ok(())
        } else {
            Err(AuthError::forbidden("flow not allowed"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(text: &str) -> RoutePattern {
        RoutePattern::parse(text).unwrap()
    }

    #[test]
    fn route_patterns() {
        let rest = route("GET /rest/**");
        assert!(rest.matches(&Method::GET, "/rest"));
        assert!(rest.matches(&Method::GET, "/rest/v1/accounts"));
        assert!(!rest.matches(&Method::POST, "/rest/v1/accounts"));
        assert!(!rest.matches(&Method::GET, "/restricted"));

        let any_method = route("* /category-tree");
        assert!(any_method.matches(&Method::DELETE, "/category-tree"));
        assert!(!any_method.matches(&Method::GET, "/category-tree/x"));

        let one = route("GET /users/*/accounts");
        assert!(one.matches(&Method::GET, "/users/u1/accounts"));
        assert!(!one.matches(&Method::GET, "/users//accounts"));
        assert!(!one.matches(&Method::GET, "/users/u1/u2/accounts"));
        // Patterns match paths; a query is never part of one (and cannot widen a match).
        assert!(!one.matches(&Method::GET, "/users/u1/accounts?x=1"));

        for bad in [
            "GET",
            "get /x",
            "GET x",
            "GET /a/**/b",
            "GET /a*",
            "GET /a b",
        ] {
            assert!(RoutePattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_rules() {
        assert_eq!(UserRule::parse("any"), Ok(UserRule::Any));
        assert_eq!(
            UserRule::parse("claim:sub"),
            Ok(UserRule::Claim("sub".into()))
        );
        assert_eq!(
            UserRule::parse("team-a-*"),
            Ok(UserRule::Prefix("team-a-".into()))
        );
        assert_eq!(
            UserRule::parse("user-1"),
            Ok(UserRule::Exact("user-1".into()))
        );
        for bad in ["*", "", "claim:", "a*b*"] {
            assert!(UserRule::parse(bad).is_err(), "{bad}");
        }
    }
}
