//! The table the bench prints: its rows, and the arithmetic its figures share (medians,
//! ratios, thousands).

use std::borrow::Borrow;

use serde::Serialize;

use crate::common;
use crate::demo::Demo;

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub section: &'static str,
    pub case: String,
    /// The main figure, in `unit`.
    pub value: Option<f64>,
    pub unit: &'static str,
    /// Everything else worth saying about it.
    pub detail: String,
}

impl Row {
    pub fn new(
        section: &'static str,
        case: impl Into<String>,
        value: Option<f64>,
        unit: &'static str,
    ) -> Self {
        Self {
            section,
            case: case.into(),
            value,
            unit,
            detail: String::new(),
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

pub fn skipped(case: &str, why: &str) -> Row {
    Row::new("skipped", case.to_string(), None, "").detail(why.to_string())
}

/// A figure of a run that a row reports beside its throughput, as the median of the runs.
#[derive(Debug, Clone, Copy)]
pub enum Figure {
    PeakRss,
    Accuracy,
    FirstPrediction,
}

/// A row of the runs' medians: images/s, then p50 and p99 and each of `figures`.
pub fn demos_row<D: Borrow<Demo>>(
    section: &'static str,
    case: String,
    demos: &[D],
    figures: &[Figure],
) -> Row {
    let median =
        |figure: fn(&Demo) -> Option<f64>| median_of(demos.iter().map(|d| figure(d.borrow())));
    let mut detail = format!(
        "p50 {} ms, p99 {} ms",
        fmt(median(|d| d.p50_ms), 1),
        fmt(median(|d| d.p99_ms), 1)
    );
    for figure in figures {
        detail.push_str(&match figure {
            Figure::PeakRss => format!(", peak RSS {} MiB", fmt(median(|d| d.peak_rss_mb), 0)),
            Figure::Accuracy => format!(
                ", accuracy {}",
                fmt(median(|d| d.accuracy.map(|a| a * 100.0)), 2)
            ),
            Figure::FirstPrediction => format!(
                ", first prediction {} s",
                fmt(median(|d| d.first_prediction_s), 1)
            ),
        });
    }
    Row::new(section, case, median(|d| d.images_per_s), "images/s").detail(detail)
}

pub fn median_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let values: Vec<f64> = values.flatten().collect();
    (!values.is_empty()).then(|| common::median(values))
}

pub fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

/// 1000000 as 1,000,000.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

pub fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.decimals$}"))
}

pub fn print_table(rows: &[Row], rounds: usize) {
    println!();
    println!("| section | case | result | details |");
    println!("| --- | --- | ---: | --- |");
    for row in rows {
        let decimals = match row.unit {
            "x" => 2,
            "s" | "ms" | "µs/image" => 1,
            _ => 0,
        };
        let value = match row.value {
            Some(_) => format!("{} {}", fmt(row.value, decimals), row.unit),
            None => "-".to_string(),
        };
        println!(
            "| {} | {} | {value} | {} |",
            row.section, row.case, row.detail
        );
    }
    println!(
        "\npipeline rows: medians of {rounds} round(s), 10,000 images each; scale rows: one run \
         each; {} cores",
        std::thread::available_parallelism().map_or(1, usize::from)
    );
}
