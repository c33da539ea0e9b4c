//! The paced section: each engine at 2,000 requests/s, at least [`PACED_RUNS`] runs each,
//! alternating, because a tail is judged run by run: every run's p99 and p99.9, their spread
//! and the worst.

use crate::demo::{Case, Demo, Paths, alternate, args, demo_case};
use crate::table::{Row, fmt, median_of};
use crate::{BATCH, PACED_RATE};

/// Paced runs per engine, at the least: a tail is judged run by run.
const PACED_RUNS: usize = 5;

/// Paced runs of each engine, alternating, at least [`PACED_RUNS`] each: every run's p99 and
/// p99.9, their spread and the worst.
pub fn paced_rows(
    paths: &Paths,
    engines: &[&str],
    rounds: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let runs_each = rounds.max(PACED_RUNS);
    eprintln!("paced at {PACED_RATE}/s, {runs_each} runs of each engine…");
    let cases: Vec<Case> = engines
        .iter()
        .map(|&engine| {
            demo_case(
                paths,
                engine.to_string(),
                args(engine, BATCH, 2, Some(PACED_RATE)),
            )
        })
        .collect();
    let runs = alternate(runs_each, &cases, |demo| {
        format!(
            "p50 {:>5.1} ms  p99 {:>6.1} ms  p99.9 {:>6.1} ms",
            demo.p50_ms.unwrap_or(0.0),
            demo.p99_ms.unwrap_or(0.0),
            demo.p999_ms.unwrap_or(0.0),
        )
    })?;
    for (engine, demos) in engines.iter().zip(&runs) {
        let each = |figure: fn(&Demo) -> Option<f64>| -> Vec<f64> {
            demos.iter().filter_map(figure).collect()
        };
        let list = |values: &[f64]| {
            values
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let worst = |values: &[f64]| values.iter().copied().reduce(f64::max);
        let best = |values: &[f64]| values.iter().copied().reduce(f64::min);
        let (p99, p999) = (each(|d| d.p99_ms), each(|d| d.p999_ms));
        let spread = worst(&p99).zip(best(&p99)).map(|(w, b)| w - b);
        let within = p99.iter().filter(|&&p| p <= 20.0).count();
        rows.push(
            Row::new(
                "paced",
                format!(
                    "{engine}, batch {BATCH}, 2 workers, paced at {PACED_RATE}/s: worst p99 of {} runs",
                    demos.len()
                ),
                worst(&p99),
                "ms",
            )
            .detail(format!(
                "p99 per run {} (spread {} ms; {within} of {} at most 20 ms); p99.9 per run {} \
                 (worst {} ms); p50 median {} ms",
                list(&p99),
                fmt(spread, 1),
                p99.len(),
                list(&p999),
                fmt(worst(&p999), 1),
                fmt(median_of(demos.iter().map(|d| d.p50_ms)), 1),
            )),
        );
    }
    Ok(())
}
