//! Aggregation of rounds (median and spread) and the Markdown/JSON output.

use serde::Serialize;

use crate::generator::RunResult;

/// All rounds of one target at one concurrency in one scenario.
#[derive(Serialize)]
pub struct Cell {
    pub scenario: &'static str,
    pub target: &'static str,
    pub concurrency: usize,
    pub rounds: Vec<RunResult>,
}

/// Medians over a cell's rounds.
#[derive(Serialize, Clone, Copy)]
pub struct Medians {
    pub requests_per_sec: f64,
    /// (max − min) / median of requests/s, in percent.
    pub spread_pct: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Summed over all rounds.
    pub non_2xx: u64,
    pub socket_errors: u64,
    /// The target's CPU µs per request (NaN when not measured), and the gateway's own time
    /// per request outside upstream I/O (NaN for other targets).
    pub cpu_us_per_request: f64,
    pub overhead_p50_us: f64,
    pub overhead_p99_us: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

impl Cell {
    pub fn medians(&self) -> Medians {
        let of = |field: fn(&RunResult) -> f64| median(self.rounds.iter().map(field).collect());
        let of_measured = |field: fn(&RunResult) -> Option<f64>| {
            median(self.rounds.iter().filter_map(field).collect())
        };
        let rps: Vec<f64> = self.rounds.iter().map(|r| r.requests_per_sec).collect();
        let (low, high) = rps
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let requests_per_sec = median(rps);
        Medians {
            requests_per_sec,
            spread_pct: 100.0 * (high - low) / requests_per_sec,
            p50_us: of(|r| r.p50_us),
            p99_us: of(|r| r.p99_us),
            p999_us: of(|r| r.p999_us),
            non_2xx: self.rounds.iter().map(|r| r.non_2xx).sum(),
            socket_errors: self.rounds.iter().map(|r| r.socket_errors).sum(),
            cpu_us_per_request: of_measured(|r| r.cpu_us_per_request),
            overhead_p50_us: of_measured(|r| r.overhead_p50_us),
            overhead_p99_us: of_measured(|r| r.overhead_p99_us),
        }
    }
}

/// The gateway compared with one other target at one concurrency.
#[derive(Serialize)]
pub struct Ratio {
    pub scenario: &'static str,
    pub concurrency: usize,
    pub versus: &'static str,
    /// gateway requests/s ÷ the other target's.
    pub throughput_ratio: f64,
    /// gateway p50 − the other target's p50, µs.
    pub p50_delta_us: f64,
    /// gateway p99 ÷ the other target's.
    pub p99_ratio: f64,
    /// gateway CPU per request ÷ the other target's (NaN when either was not measured).
    pub cpu_ratio: f64,
}

pub fn ratios(cells: &[Cell]) -> Vec<Ratio> {
    let find = |scenario: &str, target: &str, concurrency: usize| {
        cells
            .iter()
            .find(|c| c.scenario == scenario && c.target == target && c.concurrency == concurrency)
            .map(Cell::medians)
    };
    let mut ratios = Vec::new();
    for gateway in cells.iter().filter(|c| c.target == "gateway") {
        let ours = gateway.medians();
        for versus in ["passthrough", "nginx", "direct"] {
            if let Some(theirs) = find(gateway.scenario, versus, gateway.concurrency) {
                ratios.push(Ratio {
                    scenario: gateway.scenario,
                    concurrency: gateway.concurrency,
                    versus,
                    throughput_ratio: ours.requests_per_sec / theirs.requests_per_sec,
                    p50_delta_us: ours.p50_us - theirs.p50_us,
                    p99_ratio: ours.p99_us / theirs.p99_us,
                    cpu_ratio: ours.cpu_us_per_request / theirs.cpu_us_per_request,
                });
            }
        }
    }
    ratios
}

/// `{:.prec$}` of a measured value, `-` for NaN (not measured).
fn measured(value: f64, precision: usize) -> String {
    if value.is_nan() {
        "-".into()
    } else {
        format!("{value:.precision$}")
    }
}

/// The headline: CPU µs per request of every target, per scenario and concurrency, with the
/// gateway's ratios to the passthrough and nginx.
pub fn markdown_cpu(cells: &[Cell]) -> String {
    const TARGETS: [&str; 4] = ["direct", "passthrough", "gateway", "nginx"];
    let mut out = String::from(
        "| scenario | conc. | direct | passthrough | gateway | nginx | gateway ÷ passthrough | gateway ÷ nginx |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut rows: Vec<(&str, usize)> = Vec::new();
    for cell in cells.iter().filter(|c| TARGETS.contains(&c.target)) {
        if !rows.contains(&(cell.scenario, cell.concurrency)) {
            rows.push((cell.scenario, cell.concurrency));
        }
    }
    for (scenario, concurrency) in rows {
        let cpu = |target: &str| {
            cells
                .iter()
                .find(|c| {
                    c.scenario == scenario && c.concurrency == concurrency && c.target == target
                })
                .map_or(f64::NAN, |c| c.medians().cpu_us_per_request)
        };
        let [direct, passthrough, gateway, nginx] = TARGETS.map(cpu);
        out.push_str(&format!(
            "| {scenario} | {concurrency} | {} | {} | {} | {} | {} | {} |\n",
            measured(direct, 1),
            measured(passthrough, 1),
            measured(gateway, 1),
            measured(nginx, 1),
            measured(gateway / passthrough, 3),
            measured(gateway / nginx, 3),
        ));
    }
    out
}

pub fn markdown_table(cells: &[Cell]) -> String {
    let mut out = String::from(
        "| scenario | conc. | target | CPU µs/req | req/s (median) | spread | p50 µs | p99 µs | p99.9 µs | gateway own p50 / p99 µs | non-2xx | socket errors |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for cell in cells {
        let m = cell.medians();
        let own = if m.overhead_p50_us.is_nan() {
            "-".to_owned()
        } else {
            format!("{:.0} / {:.0}", m.overhead_p50_us, m.overhead_p99_us)
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | ±{:.1}% | {:.0} | {:.0} | {:.0} | {own} | {} | {} |\n",
            cell.scenario,
            cell.concurrency,
            cell.target,
            measured(m.cpu_us_per_request, 1),
            m.requests_per_sec,
            m.spread_pct / 2.0,
            m.p50_us,
            m.p99_us,
            m.p999_us,
            m.non_2xx,
            m.socket_errors
        ));
    }
    out
}

pub fn markdown_ratios(ratios: &[Ratio]) -> String {
    let mut out = String::from(
        "| scenario | conc. | gateway vs | CPU/req ratio | req/s ratio | p50 Δ µs | p99 ratio |\n|---|---:|---|---:|---:|---:|---:|\n",
    );
    for r in ratios {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {:+.0} | {:.2} |\n",
            r.scenario,
            r.concurrency,
            r.versus,
            measured(r.cpu_ratio, 3),
            r.throughput_ratio,
            r.p50_delta_us,
            r.p99_ratio
        ));
    }
    out
}
