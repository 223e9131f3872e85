//! The status page (`GET /admin/`) and its login form (`/admin/login`): server-rendered HTML
//! with inline CSS and an inline SVG, no script, no external asset, every value escaped.
//!
//! The page shows connections by status, the refresh-token age distribution with finX's
//! 90-day limit marked, the connections nearest to lapsing, those waiting for a new consent,
//! recent events and the token cache's and refreshes' counters. Like the API it shows metadata only, never a token.

use std::fmt::Write as _;

use http::{header, HeaderValue, Method, Response, StatusCode};
use pingora::protocols::http::ServerSession;
use secrecy::ExposeSecret;
use serde_json::Value;
use zeroize::Zeroize;

use super::session::{COOKIE_NAME, SESSION_LIFETIME_SECS};
use super::{answer, constant_time_eq, error_answer, method_not_allowed, read_body, AdminApp};
use crate::clock::{format_utc, UnixSeconds};
use crate::error::AdminError;
use crate::html::escape;
use crate::metrics::{NEAR_LAPSE_SECS, REFRESH_TOKEN_LIFETIME_SECS};
use crate::store::{ConnectionStatus, ConnectionSummary};
use crate::tokens::TokenStats;

/// How many connections the "nearest to lapsing" table lists.
const NEAREST_TO_LAPSE: usize = 20;
/// How many events the page lists.
const RECENT_EVENTS: usize = 50;
const DAY_SECS: i64 = 24 * 3600;
/// The age histogram's bins: ten days wide up to finX's 90 days, then one bin of lapsed tokens.
const BIN_DAYS: i64 = 10;
const BINS_BEFORE_LIMIT: usize = 9;

/// No script may run, nothing may be loaded from elsewhere, no other site may frame the page.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// An HTML answer with the page's security headers.
fn html(
    status: StatusCode,
    body: String,
    extra: &[(header::HeaderName, HeaderValue)],
) -> Response<Vec<u8>> {
    let mut headers = vec![
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
    ];
    headers.extend(extra.iter().cloned());
    answer(
        status,
        "text/html; charset=utf-8",
        body.into_bytes(),
        &headers,
    )
}

/// 303 to `location`, with extra headers.
fn see_other(
    location: &'static str,
    extra: &[(header::HeaderName, HeaderValue)],
) -> Response<Vec<u8>> {
    let mut headers = vec![(header::LOCATION, HeaderValue::from_static(location))];
    headers.extend(extra.iter().cloned());
    html(
        StatusCode::SEE_OTHER,
        format!("<!doctype html><title>Redirect</title><a href=\"{location}\">continue</a>"),
        &headers,
    )
}

/// The status page asked for without credentials: to the login form.
pub fn to_login() -> Response<Vec<u8>> {
    see_other("/admin/login", &[])
}

/// `POST /admin/logout`: ends the browser's session (the cookie is cleared).
pub fn logout(method: &Method) -> Response<Vec<u8>> {
    if *method != Method::POST {
        return method_not_allowed("POST");
    }
    let clear = format!("{COOKIE_NAME}=; HttpOnly; SameSite=Strict; Path=/admin; Max-Age=0");
    match HeaderValue::try_from(clear) {
        Ok(cookie) => see_other("/admin/login", &[(header::SET_COOKIE, cookie)]),
        Err(_) => to_login(),
    }
}

/// `GET /admin/login` shows the form; `POST /admin/login` with `credential=<admin credential>`
/// sets the session cookie and goes to the status page.
pub async fn login(
    app: &AdminApp,
    session: &mut ServerSession,
    method: &Method,
) -> Response<Vec<u8>> {
    match *method {
        Method::GET => html(StatusCode::OK, login_form(None), &[]),
        Method::POST => {
            let mut body = match read_body(session).await {
                Ok(body) => body,
                Err(error) => return error_answer(&error),
            };
            let mut presented = url::form_urlencoded::parse(&body)
                .find(|(name, _)| name == "credential")
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default();
            body.zeroize();
            let accepted = app.settings.credential.as_ref().filter(|expected| {
                constant_time_eq(presented.as_bytes(), expected.expose_secret().as_bytes())
            });
            presented.zeroize();
            let issued =
                accepted.and_then(|credential| app.sessions.issue(credential, app.clock.now()));
            let cookie = issued.and_then(|value| {
                HeaderValue::try_from(format!(
                    "{COOKIE_NAME}={value}; HttpOnly; SameSite=Strict; Path=/admin; \
                     Max-Age={SESSION_LIFETIME_SECS}"
                ))
                .ok()
            });
            match cookie {
                Some(cookie) => {
                    tracing::info!("admin status page: logged in");
                    see_other("/admin/", &[(header::SET_COOKIE, cookie)])
                }
                None => {
                    tracing::warn!("admin status page: a login with a wrong credential");
                    let refused = AdminError::LoginRefused;
                    html(refused.status(), login_form(Some(&refused.message())), &[])
                }
            }
        }
        _ => method_not_allowed("GET, POST"),
    }
}

fn login_form(problem: Option<&str>) -> String {
    let mut page = head("finx-gateway admin: log in");
    page.push_str("<main class=\"narrow\"><h1>finx-gateway admin</h1>");
    if let Some(problem) = problem {
        let _ = write!(
            page,
            "<p class=\"problem\" id=\"login-problem\">{}</p>",
            escape(problem)
        );
    }
    page.push_str(
        "<form method=\"post\" action=\"/admin/login\">\
         <label for=\"credential\">Admin credential</label>\
         <input type=\"password\" id=\"credential\" name=\"credential\" autocomplete=\"current-password\" required autofocus>\
         <button type=\"submit\" id=\"login\">Log in</button></form>\
         <p class=\"note\">The credential is the <code>[admin] credential</code> of the gateway's \
         configuration. The browser then holds a session cookie for this page only; the admin \
         API itself takes the credential as a bearer token.</p></main></body></html>",
    );
    page
}

/// `GET /admin/`: the status page.
pub async fn status(app: &AdminApp) -> Response<Vec<u8>> {
    let connections = match app.store.list().await {
        Ok(connections) => connections,
        Err(error) => {
            tracing::warn!(%error, "admin status page: the store cannot be listed");
            let mut page = head("finx-gateway admin");
            page.push_str(
                "<main><h1>finx-gateway admin</h1><p class=\"problem\">The token store cannot \
                 be read right now; try again.</p></main></body></html>",
            );
            return html(AdminError::StoreUnavailable.status(), page, &[]);
        }
    };
    let counters = Counters {
        cache_hits: app.metrics.cache_hits.get(),
        cache_misses: app.metrics.cache_misses.get(),
        cache_entries: app.tokens.cached_entries(),
        refreshes: app.metrics.refresh_counts(),
        stats: app.tokens.stats(),
    };
    let events = app.recent_events(RECENT_EVENTS).await;
    html(
        StatusCode::OK,
        render_status(app.clock.now(), &connections, &events, &counters),
        &[],
    )
}

/// The token cache's and the refreshes' counters shown on the page.
struct Counters {
    cache_hits: u64,
    cache_misses: u64,
    cache_entries: u64,
    refreshes: Vec<(&'static str, u64)>,
    stats: TokenStats,
}

fn age_secs(connection: &ConnectionSummary, now: UnixSeconds) -> i64 {
    super::refresh_token_age_secs(connection, now)
}

fn render_status(
    now: UnixSeconds,
    connections: &[ConnectionSummary],
    events: &[Value],
    counters: &Counters,
) -> String {
    let mut page = head("finx-gateway admin");
    let _ = write!(
        page,
        "<header><h1>finx-gateway admin</h1><span class=\"note\">as of {} UTC</span>\
         <form method=\"post\" action=\"/admin/logout\"><button type=\"submit\">Log out</button></form></header><main>",
        format_utc(now)
    );

    // Connections by status.
    let count =
        |status: ConnectionStatus| connections.iter().filter(|c| c.status == status).count();
    let active: Vec<&ConnectionSummary> = connections
        .iter()
        .filter(|c| c.status == ConnectionStatus::Active)
        .collect();
    let near_lapse = active
        .iter()
        .filter(|c| age_secs(c, now) >= REFRESH_TOKEN_LIFETIME_SECS - NEAR_LAPSE_SECS)
        .count();
    let _ = write!(
        page,
        "<section id=\"connections-by-status\"><h2>Connections</h2><div class=\"tiles\">\
         <div class=\"tile\"><b>{}</b>total</div>\
         <div class=\"tile ok\"><b id=\"count-active\">{}</b>active</div>\
         <div class=\"tile warn\"><b id=\"count-reauth_required\">{}</b>reauth required</div>\
         <div class=\"tile\"><b id=\"count-revoked\">{}</b>revoked</div>\
         <div class=\"tile warn\"><b id=\"count-near-lapse\">{}</b>active, lapsing within {} days</div>\
         </div></section>",
        connections.len(),
        count(ConnectionStatus::Active),
        count(ConnectionStatus::ReauthRequired),
        count(ConnectionStatus::Revoked),
        near_lapse,
        NEAR_LAPSE_SECS / DAY_SECS,
    );

    // Refresh-token age histogram.
    let ages: Vec<i64> = active.iter().map(|c| age_secs(c, now)).collect();
    page.push_str("<section id=\"age-histogram\"><h2>Refresh-token age (active connections)</h2>");
    page.push_str(&histogram_svg(&ages));
    page.push_str(
        "<p class=\"note\">finX lapses a refresh token 90 days after it was issued (at consent \
         or at a refresh); the keeper refreshes idle connections well before.</p></section>",
    );

    // Nearest to lapsing.
    let mut nearest = active.clone();
    nearest.sort_by_key(|c| std::cmp::Reverse(age_secs(c, now)));
    nearest.truncate(NEAREST_TO_LAPSE);
    let _ = write!(
        page,
        "<section id=\"near-lapse\"><h2>Nearest to lapsing (top {NEAREST_TO_LAPSE})</h2>"
    );
    if nearest.is_empty() {
        page.push_str("<p class=\"note\">No active connection.</p>");
    } else {
        page.push_str(
            "<table><thead><tr><th>connection</th><th>refresh token issued</th>\
             <th class=\"num\">age (days)</th><th class=\"num\">days until lapse</th>\
             <th>last used</th></tr></thead><tbody>",
        );
        for c in &nearest {
            let age = age_secs(c, now);
            let left = (REFRESH_TOKEN_LIFETIME_SECS - age).div_euclid(DAY_SECS);
            let class = if age >= REFRESH_TOKEN_LIFETIME_SECS - NEAR_LAPSE_SECS {
                " class=\"warn\""
            } else {
                ""
            };
            let _ = write!(
                page,
                "<tr{class}><td class=\"key\">{}</td><td>{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td>{}</td></tr>",
                escape(c.key.as_str()),
                format_utc(c.refreshed_at.unwrap_or(c.created_at)),
                age.div_euclid(DAY_SECS),
                left,
                c.last_used_at
                    .map_or_else(|| "never".to_owned(), format_utc),
            );
        }
        page.push_str("</tbody></table>");
    }
    page.push_str("</section>");

    // Connections whose user must consent again.
    let mut reauth: Vec<&ConnectionSummary> = connections
        .iter()
        .filter(|c| c.status == ConnectionStatus::ReauthRequired)
        .collect();
    reauth.sort_by_key(|c| std::cmp::Reverse(c.updated_at));
    let _ = write!(
        page,
        "<section id=\"reauth\"><h2>Waiting for a new consent (most recent {NEAREST_TO_LAPSE})</h2>"
    );
    if reauth.is_empty() {
        page.push_str("<p class=\"note\">None.</p>");
    } else {
        page.push_str(
            "<table><thead><tr><th>connection</th><th>since</th><th>last used</th></tr></thead><tbody>",
        );
        for c in reauth.iter().take(NEAREST_TO_LAPSE) {
            let _ = write!(
                page,
                "<tr><td class=\"key\">{}</td><td>{}</td><td>{}</td></tr>",
                escape(c.key.as_str()),
                format_utc(c.updated_at),
                c.last_used_at
                    .map_or_else(|| "never".to_owned(), format_utc),
            );
        }
        page.push_str("</tbody></table>");
    }
    page.push_str("</section>");

    // Recent events (fed by `AdminApp::recent_events`).
    page.push_str("<section id=\"events\"><h2>Recent events</h2>");
    if events.is_empty() {
        page.push_str("<p class=\"note\" id=\"no-events\">No connection events recorded.</p>");
    } else {
        page.push_str(
            "<table><thead><tr><th>time</th><th>connection</th><th>event</th><th>details</th></tr></thead><tbody>",
        );
        for event in events {
            page.push_str(&event_row(event));
        }
        page.push_str("</tbody></table>");
    }
    page.push_str("</section>");

    // Counters.
    let stats = &counters.stats;
    let lookups = counters.cache_hits + counters.cache_misses;
    let hit_ratio = if lookups == 0 {
        "-".to_owned()
    } else {
        format!(
            "{:.1} %",
            counters.cache_hits as f64 * 100.0 / lookups as f64
        )
    };
    page.push_str("<section id=\"counters\"><h2>Token cache and refreshes</h2><div class=\"columns\"><table><tbody>");
    for (name, value) in [
        ("cache hits", counters.cache_hits.to_string()),
        ("cache misses", counters.cache_misses.to_string()),
        ("cache hit ratio", hit_ratio),
        ("access tokens cached", counters.cache_entries.to_string()),
        (
            "requests that waited for a refresh",
            stats.requests_waited.to_string(),
        ),
    ] {
        let _ = write!(
            page,
            "<tr><th>{}</th><td class=\"num\">{}</td></tr>",
            escape(name),
            escape(&value)
        );
    }
    page.push_str("</tbody></table><table><tbody>");
    for (outcome, value) in &counters.refreshes {
        let _ = write!(
            page,
            "<tr><th>refreshes at finX: {}</th><td class=\"num\">{value}</td></tr>",
            escape(outcome)
        );
    }
    for (name, value) in [
        ("refreshes committed", stats.refreshes),
        ("of those ahead of expiry", stats.refreshes_ahead),
        ("refreshes forced by a finX 401", stats.forced_refreshes),
        ("interrupted refreshes recovered", stats.rotations_recovered),
        ("interrupted refreshes lost", stats.rotations_lost),
        ("grants journaled (store refused)", stats.journaled),
    ] {
        let _ = write!(
            page,
            "<tr><th>{}</th><td class=\"num\">{value}</td></tr>",
            escape(name)
        );
    }
    page.push_str("</tbody></table></div></section></main></body></html>");
    page
}

/// One event as a table row: its time, connection and kind where it names them (`at`/`time`,
/// `key`/`connection`, `event`/`kind`/`type`), every other field as details.
fn event_row(event: &Value) -> String {
    let Some(fields) = event.as_object() else {
        return format!(
            "<tr><td></td><td></td><td></td><td>{}</td></tr>",
            escape(&event.to_string())
        );
    };
    let text = |value: &Value| match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let time = pick(fields, &["at", "time"]);
    let key = pick(fields, &["key", "connection"]);
    let kind = pick(fields, &["event", "kind", "type"]);
    let used: Vec<&str> = [time, key, kind]
        .iter()
        .flatten()
        .map(|(name, _)| *name)
        .collect();
    let details: Vec<String> = fields
        .iter()
        .filter(|(name, _)| !used.contains(&name.as_str()))
        .map(|(name, value)| format!("{name}={}", text(value)))
        .collect();
    format!(
        "<tr><td>{}</td><td class=\"key\">{}</td><td>{}</td><td>{}</td></tr>",
        escape(&time.map_or_else(String::new, |(_, v)| match v.as_i64() {
            Some(at) => format_utc(at),
            None => text(v),
        })),
        escape(&key.map_or_else(String::new, |(_, v)| text(v))),
        escape(&kind.map_or_else(String::new, |(_, v)| text(v))),
        escape(&details.join(" ")),
    )
}

/// The first of `names` that `fields` has, with its value.
fn pick<'a>(
    fields: &'a serde_json::Map<String, Value>,
    names: &[&'static str],
) -> Option<(&'static str, &'a Value)> {
    names
        .iter()
        .find_map(|name| fields.get(*name).map(|value| (*name, value)))
}

/// The age histogram as an inline SVG: ten-day bins up to 90 days and a bin of lapsed tokens,
/// the 90-day limit marked.
fn histogram_svg(ages: &[i64]) -> String {
    let mut bins = [0usize; BINS_BEFORE_LIMIT + 1];
    for age in ages {
        let days = (*age).max(0) / DAY_SECS;
        let bin = usize::try_from(days / BIN_DAYS)
            .unwrap_or(usize::MAX)
            .min(BINS_BEFORE_LIMIT);
        bins[bin] += 1;
    }
    let (width, height, left, bottom, top) = (660.0, 220.0, 40.0, 40.0, 20.0);
    let plot_height = height - bottom - top;
    let bar_slot = (width - left - 10.0) / bins.len() as f64;
    let max = bins.iter().copied().max().unwrap_or(0).max(1) as f64;
    let mut svg = format!(
        "<svg id=\"age-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"refresh-token age histogram\">"
    );
    let axis_y = height - bottom;
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{axis_y}\" x2=\"{}\" y2=\"{axis_y}\" stroke=\"#555\"/>",
        width - 10.0
    );
    for (index, count) in bins.iter().enumerate() {
        let bar_height = (*count as f64 / max) * plot_height;
        let x = left + index as f64 * bar_slot + 4.0;
        let y = axis_y - bar_height;
        let lapsed = index == BINS_BEFORE_LIMIT;
        let near = index == BINS_BEFORE_LIMIT - 1;
        let fill = if lapsed {
            "#b3261e"
        } else if near {
            "#d08a00"
        } else {
            "#3b6ea5"
        };
        let label = if lapsed {
            "≥90".to_owned()
        } else {
            format!(
                "{}–{}",
                index as i64 * BIN_DAYS,
                (index as i64 + 1) * BIN_DAYS
            )
        };
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bar_height:.1}\" fill=\"{fill}\">\
             <title>{label} days: {count}</title></rect>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{count}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{label}</text>",
            bar_slot - 8.0,
            x + (bar_slot - 8.0) / 2.0,
            y - 4.0,
            x + (bar_slot - 8.0) / 2.0,
            axis_y + 15.0,
        );
    }
    let limit_x = left + BINS_BEFORE_LIMIT as f64 * bar_slot;
    let _ = write!(
        svg,
        "<line id=\"limit-90-days\" x1=\"{limit_x:.1}\" y1=\"{top}\" x2=\"{limit_x:.1}\" y2=\"{axis_y}\" \
         stroke=\"#b3261e\" stroke-width=\"2\" stroke-dasharray=\"6 4\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"#b3261e\" text-anchor=\"end\">90-day limit</text>\
         <text x=\"{left}\" y=\"{:.1}\" font-size=\"11\">days since the refresh token was issued</text></svg>",
        limit_x - 4.0,
        top + 10.0,
        height - 6.0,
    );
    svg
}

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"referrer\" content=\"no-referrer\"><title>{}</title><style>{STYLE}</style></head><body>",
        escape(title)
    )
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}\
header{display:flex;gap:1em;align-items:baseline;padding:.6em 1.5em;background:#1f3347;color:#fff}\
header h1{font-size:1.2em;margin:0}header form{margin-left:auto}\
main{padding:1em 1.5em;max-width:1100px}main.narrow{max-width:420px;margin:3em auto;background:#fff;padding:1.5em;border-radius:6px}\
section{background:#fff;border-radius:6px;padding:.8em 1.2em;margin-bottom:1em;box-shadow:0 1px 2px #0002}\
h2{font-size:1.05em;margin:.2em 0 .6em}.note{color:#666}.problem{color:#b3261e;font-weight:600}\
.tiles{display:flex;flex-wrap:wrap;gap:.8em}.tile{padding:.5em 1em;border:1px solid #ddd;border-radius:6px;min-width:7em}\
.tile b{display:block;font-size:1.6em}.tile.ok b{color:#1e7a34}.tile.warn b{color:#b36b00}\
table{border-collapse:collapse;margin:.3em 1em .3em 0}th,td{padding:.25em .7em;border-bottom:1px solid #eee;text-align:left}\
.num{text-align:right;font-variant-numeric:tabular-nums}.key{font-family:ui-monospace,monospace}\
tr.warn td{background:#fff4e0}.columns{display:flex;flex-wrap:wrap;align-items:flex-start}\
label{display:block;margin:.5em 0 .2em}input{width:100%;padding:.4em;box-sizing:border-box}\
button{margin-top:.8em;padding:.4em 1em}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ConnectionKey;

    fn summary(key: &str, status: ConnectionStatus, issued_at: i64) -> ConnectionSummary {
        ConnectionSummary {
            key: ConnectionKey::from_stored(key).expect("valid key"),
            status,
            version: 1,
            created_at: issued_at,
            refreshed_at: None,
            synced_at: None,
            updated_at: issued_at,
            last_used_at: None,
            scope: None,
        }
    }

    fn counters() -> Counters {
        Counters {
            cache_hits: 3,
            cache_misses: 1,
            cache_entries: 2,
            refreshes: vec![("ok", 4), ("invalid_grant", 1)],
            stats: TokenStats::default(),
        }
    }

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert('x')</script> & "q""#),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn the_page_shows_counts_histogram_nearest_and_escaped_events() {
        let now = 1_700_000_000;
        let connections = vec![
            summary("alice", ConnectionStatus::Active, now - 85 * DAY_SECS),
            summary("bob", ConnectionStatus::Active, now - 3 * DAY_SECS),
            summary(
                "flow:demo/f-1",
                ConnectionStatus::Active,
                now - 95 * DAY_SECS,
            ),
            summary("carol", ConnectionStatus::ReauthRequired, now),
            summary("dave", ConnectionStatus::Revoked, now),
        ];
        let events = vec![serde_json::json!({
            "at": now, "key": "alice", "event": "<b>revoked</b>", "by": "admin\"api"
        })];
        let page = render_status(now, &connections, &events, &counters());
        assert!(page.contains("id=\"count-active\">3<"), "{page}");
        assert!(page.contains("id=\"count-reauth_required\">1<"));
        assert!(page.contains("id=\"count-revoked\">1<"));
        assert!(
            page.contains("id=\"count-near-lapse\">2<"),
            "alice and the lapsed flow"
        );
        assert!(page.contains("id=\"limit-90-days\""));
        assert!(page.contains("<title>≥90 days: 1</title>"));
        assert!(page.contains("<title>80–90 days: 1</title>"));
        // The lapsed flow first, then alice, then bob; no inactive connection.
        let at = |needle: &str| page.find(needle).unwrap_or(usize::MAX);
        assert!(at("flow:demo/f-1") < at(">alice<") && at(">alice<") < at(">bob<"));
        let reauth = &page[at("id=\"reauth\"")..at("id=\"events\"")];
        assert!(
            reauth.contains(">carol<") && !reauth.contains(">alice<"),
            "{reauth}"
        );
        assert!(
            !page.contains(">dave<"),
            "revoked connections are only counted"
        );
        assert!(
            at(">carol<") > at("id=\"reauth\""),
            "carol is not near lapse"
        );
        assert!(page.contains("&lt;b&gt;revoked&lt;/b&gt;") && !page.contains("<b>revoked"));
        assert!(page.contains("by=admin&quot;api"));
        assert!(page.contains("75.0 %"), "hit ratio");
        assert!(!page.contains("<script"));

        let empty = render_status(now, &[], &[], &counters());
        assert!(empty.contains("id=\"no-events\""));
        assert!(empty.contains("No active connection."));
    }
}
