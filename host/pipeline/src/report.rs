//! `switchyard report`: one run's predictions, read back from the results store, as a terminal
//! summary and as an HTML page with plots.
//!
//! Why from the store and not from the consumer: the store holds every prediction of the run
//! exactly once, whichever worker stored it and whether or not one trapped, and it outlives the
//! process, so a run can be reported on (and compared) long after it ended. The numbers are the
//! demo's own: accuracy, per-class accuracy and latency come from the same
//! [`pipeline_core::tally::Tally`] the demo's summary uses; the report adds the confusion
//! matrix and the distributions behind them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use pipeline_core::CLASS_NAMES;
use pipeline_core::tally::{Summary, Tally};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::predictions::{self, PredictionRecord, RunInfo};
use switchyard_runtime::results::{Results, ResultsError};

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The store could not be read.
    #[error(transparent)]
    Results(#[from] ResultsError),
    /// The store holds no run at all.
    #[error("{store} holds no predictions yet: run `switchyard demo` (or a pipeline) first")]
    NoRuns {
        /// The store.
        store: String,
    },
    /// The store holds no run of that id.
    #[error("{store} holds no run {run:?}; its latest runs: {latest}")]
    NoSuchRun {
        /// The store.
        store: String,
        /// The id asked for.
        run: String,
        /// The latest runs, with their sizes.
        latest: String,
    },
    /// A plot could not be drawn.
    #[error("drawing the {plot}: {error}")]
    Plot {
        /// Which plot.
        plot: &'static str,
        /// What plotters said (in the message, so not also a `source`).
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The report could not be written.
    #[error("writing {path}: {error}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error (in the message, so not also a `source`).
        error: std::io::Error,
    },
}

/// Where the demo writes its reports unless told otherwise: `reports/RUN` in switchyard's data
/// directory.
pub fn default_reports_dir(run_id: &str) -> PathBuf {
    switchyard_runtime::user_data_dir("reports")
        .unwrap_or_else(|| PathBuf::from("switchyard-reports"))
        .join(run_id)
}

/// The bars of the latency histogram and the points of the throughput plot.
const BINS: usize = 40;

/// One run's results.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The run.
    pub run_id: String,
    /// The store it was read from.
    pub store: String,
    /// The demo's numbers for it.
    pub summary: Summary,
    /// Predictions by `[label][predicted class]`, over the labelled predictions.
    pub confusion: [[u64; 10]; 10],
    /// Latency from `sent-at` to arrival of each prediction that has one, in ms, sorted.
    pub latencies_ms: Vec<f64>,
    /// Arrival times, in seconds from the first request sent (or the first arrival), sorted.
    pub arrivals_s: Vec<f64>,
    /// The models and component builds that made the predictions, with their counts.
    pub made_by: Vec<(String, u64)>,
    /// Where each request's time went, for the predictions that carry every hop's time, in
    /// the order they were sent.
    pub hops: Vec<Hops>,
}

/// What a report needs of each prediction, gathered one prediction at a time.
#[derive(Default)]
struct Gathered {
    tally: Tally,
    confusion: [[u64; 10]; 10],
    latencies_ms: Vec<f64>,
    received_ms: Vec<f64>,
    /// (model, component build) and how many predictions they made; a handful of entries.
    made_by: Vec<((String, Option<String>), u64)>,
    /// Sent, handled, predicted and received (Unix ms), of each prediction that has them all.
    hop_times: Vec<[f64; 4]>,
}

impl Gathered {
    fn add(&mut self, record: &PredictionRecord) {
        let prediction = &record.prediction;
        self.tally.record(prediction, record.received_at_ms);
        if let Some(label) = prediction.label.filter(|&l| l < 10)
            && prediction.class < 10
        {
            self.confusion[label][prediction.class] += 1;
        }
        if let Some(sent) = prediction.sent_at_ms {
            self.latencies_ms
                .push((record.received_at_ms - sent).max(0.0));
        }
        self.received_ms.push(record.received_at_ms);
        let component = record.component.as_deref();
        match self
            .made_by
            .iter_mut()
            .find(|((model, by), _)| *model == prediction.model && by.as_deref() == component)
        {
            Some((_, count)) => *count += 1,
            None => self
                .made_by
                .push(((prediction.model.clone(), record.component.clone()), 1)),
        }
        if let (Some(sent), Some(handled), Some(predicted)) = (
            prediction.sent_at_ms,
            prediction.handled_at_ms,
            prediction.predicted_at_ms,
        ) {
            self.hop_times
                .push([sent, handled, predicted, record.received_at_ms]);
        }
    }

    fn report(self, run_id: String, store: String) -> RunReport {
        let summary = self.tally.summary();
        let start = summary
            .first_sent_ms
            .or(summary.first_received_ms)
            .unwrap_or(0.0);
        let mut arrivals_s: Vec<f64> = self
            .received_ms
            .iter()
            .map(|received| ((received - start) / 1000.0).max(0.0))
            .collect();
        arrivals_s.sort_by(f64::total_cmp);
        let mut latencies_ms = self.latencies_ms;
        latencies_ms.sort_by(f64::total_cmp);
        let mut hops: Vec<Hops> = self
            .hop_times
            .iter()
            .map(|&times| Hops::of(times, start))
            .collect();
        hops.sort_by(|a, b| a.sent_s.total_cmp(&b.sent_s));
        let mut made_by: Vec<(String, u64)> = self
            .made_by
            .into_iter()
            .map(|((model, component), count)| match component {
                Some(component) => (format!("{model} by {component}"), count),
                None => (model, count),
            })
            .collect();
        made_by.sort();
        RunReport {
            run_id,
            store,
            summary,
            confusion: self.confusion,
            latencies_ms,
            arrivals_s,
            made_by,
            hops,
        }
    }
}

/// One request's way through the pipeline, in ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hops {
    /// When it was sent, in seconds from the first request sent.
    pub sent_s: f64,
    /// From sent to the classifier being handed it: the first broker hop and any wait for a
    /// free classifier instance.
    pub to_classifier_ms: f64,
    /// In the classifier: decoding, the model run (shared with its batch) and the send.
    pub in_classifier_ms: f64,
    /// From the prediction sent to the consumer storing it: the second broker hop.
    pub to_consumer_ms: f64,
}

impl Hops {
    /// The hops' names, as the report prints them, in order.
    pub const NAMES: [&str; 3] = [
        "sent → classifier",
        "in the classifier",
        "classifier → stored",
    ];

    /// The hops of a request sent, handled, predicted and received at `times` (Unix ms).
    fn of(times: [f64; 4], start_ms: f64) -> Self {
        let [sent, handled, predicted, received] = times;
        Self {
            sent_s: (sent - start_ms) / 1000.0,
            to_classifier_ms: handled - sent,
            in_classifier_ms: predicted - handled,
            to_consumer_ms: received - predicted,
        }
    }

    /// The three hops, in the order of [`Hops::NAMES`].
    pub fn values(&self) -> [f64; 3] {
        [
            self.to_classifier_ms,
            self.in_classifier_ms,
            self.to_consumer_ms,
        ]
    }

    fn total_ms(&self) -> f64 {
        self.values().iter().sum()
    }
}

impl RunReport {
    /// Reads run `run_id` (the latest run when `None`) from `results`.
    pub async fn read(results: &Results, run_id: Option<&str>) -> Result<Self, ReportError> {
        let store = results.describe();
        let runs = predictions::runs(results).await?;
        let run_id = match run_id {
            Some(run) if runs.iter().any(|r| r.run_id == run) => run.to_string(),
            Some(run) => {
                return Err(if runs.is_empty() {
                    ReportError::NoRuns { store }
                } else {
                    ReportError::NoSuchRun {
                        store,
                        run: run.to_string(),
                        latest: latest(&runs),
                    }
                });
            }
            None => match runs.first() {
                Some(run) => run.run_id.clone(),
                None => return Err(ReportError::NoRuns { store }),
            },
        };
        Ok(Self::of_run(results, &run_id).await?)
    }

    /// The report of run `run_id` in `results`, read a page at a time: what it keeps is ~50 B
    /// a prediction, where the rows are ~600 B.
    pub async fn of_run(results: &Results, run_id: &str) -> Result<Self, ResultsError> {
        let mut gathered = Gathered::default();
        let mut pages = predictions::pages(results, run_id);
        while let Some(page) = pages.next().await? {
            page.iter().for_each(|record| gathered.add(record));
        }
        Ok(gathered.report(run_id.to_string(), results.describe()))
    }

    /// The report of `records`, the predictions of run `run_id` in `store`.
    pub fn new(run_id: String, store: String, records: &[PredictionRecord]) -> Self {
        let mut gathered = Gathered::default();
        records.iter().for_each(|record| gathered.add(record));
        gathered.report(run_id, store)
    }

    /// Each hop's p50, p99 and maximum, and its mean over the slowest 1 % of requests (by
    /// their whole way), in ms; `None` without per-hop times (older rows).
    pub fn hop_table(&self) -> Option<[[f64; 4]; 3]> {
        if self.hops.is_empty() {
            return None;
        }
        let mut slowest = self.hops.clone();
        slowest.sort_by(|a, b| b.total_ms().total_cmp(&a.total_ms()));
        slowest.truncate(self.hops.len().div_ceil(100));
        let mut table = [[0.0; 4]; 3];
        for (hop, row) in table.iter_mut().enumerate() {
            let mut values: Vec<f64> = self.hops.iter().map(|h| h.values()[hop]).collect();
            values.sort_by(f64::total_cmp);
            let at = |quantile: f64| {
                let rank =
                    ((quantile * values.len() as f64).ceil() as usize).clamp(1, values.len());
                values[rank - 1]
            };
            let mean_of_slowest =
                slowest.iter().map(|h| h.values()[hop]).sum::<f64>() / slowest.len() as f64;
            *row = [at(0.5), at(0.99), at(1.0), mean_of_slowest];
        }
        Some(table)
    }

    /// Predictions per second from the first request sent to the last prediction.
    pub fn throughput(&self) -> Option<f64> {
        let seconds = *self.arrivals_s.last()?;
        (seconds > 0.0).then(|| self.summary.predictions as f64 / seconds)
    }

    /// The latency at `quantile` (nearest rank), in ms.
    pub fn latency_ms(&self, quantile: f64) -> Option<f64> {
        let last = self.latencies_ms.len().checked_sub(1)?;
        let rank = ((quantile * self.latencies_ms.len() as f64).ceil() as usize).clamp(1, last + 1);
        self.latencies_ms.get(rank - 1).copied()
    }

    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let percent = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2} %", v * 100.0));
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
        let s = &self.summary;
        let _ = writeln!(out, "run {} in {}", self.run_id, self.store);
        let _ = writeln!(
            out,
            "  predictions   {} ({} with a label, {} right)",
            s.predictions, s.labelled, s.correct
        );
        let _ = writeln!(out, "  accuracy      {}", percent(s.accuracy));
        let _ = writeln!(
            out,
            "  throughput    {}",
            self.throughput()
                .map_or("-".to_string(), |t| format!("{t:.0} predictions/s"))
        );
        let _ = writeln!(
            out,
            "  latency       p50 {} · p90 {} · p99 {} · p99.9 {} · max {}",
            ms(self.latency_ms(0.5)),
            ms(self.latency_ms(0.9)),
            ms(self.latency_ms(0.99)),
            ms(self.latency_ms(0.999)),
            ms(self.latency_ms(1.0))
        );
        for (by, count) in &self.made_by {
            let _ = writeln!(out, "  made by       {by} ({count})");
        }
        if let Some(table) = self.hop_table() {
            let _ = writeln!(
                out,
                "\nwhere the time went, ms    p50      p99      max   slowest 1 % (mean)"
            );
            for (name, [p50, p99, max, slowest]) in Hops::NAMES.iter().zip(table) {
                let _ = writeln!(
                    out,
                    "  {name:<22}{p50:>7.1}  {p99:>7.1}  {max:>7.1}  {slowest:>7.1}"
                );
            }
        }
        let _ = writeln!(out, "\nper class (accuracy over its labelled predictions)");
        for (class, name) in CLASS_NAMES.iter().enumerate() {
            let labelled: u64 = self.confusion[class].iter().sum();
            let _ = writeln!(
                out,
                "  {name:<12} {:>9}  ({labelled})",
                percent(s.per_class_accuracy.get(class).copied().flatten())
            );
        }
        let _ = writeln!(out, "\nconfusion matrix (rows: label, columns: predicted)");
        let _ = write!(out, "  {:<12}", "");
        for class in 0..10 {
            let _ = write!(out, "{:>6}", short_name(class));
        }
        out.push('\n');
        for (label, row) in self.confusion.iter().enumerate() {
            let _ = write!(out, "  {:<12}", CLASS_NAMES[label]);
            for count in row {
                let _ = write!(out, "{count:>6}");
            }
            out.push('\n');
        }
        out
    }

    /// Writes `report.html` (the plots inline) and the plots as SVG files beside it into
    /// `dir`, creating it; returns the page's path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, ReportError> {
        let write = |path: PathBuf, text: &str| {
            std::fs::write(&path, text)
                .map(|()| path.clone())
                .map_err(|error| ReportError::Write { path, error })
        };
        std::fs::create_dir_all(dir).map_err(|error| ReportError::Write {
            path: dir.to_path_buf(),
            error,
        })?;
        let confusion = self.confusion_svg()?;
        let latency = self.latency_svg()?;
        let throughput = self.throughput_svg()?;
        let hops = self.hops_svg()?;
        write(dir.join("confusion.svg"), &confusion)?;
        write(dir.join("latency.svg"), &latency)?;
        write(dir.join("throughput.svg"), &throughput)?;
        if let Some(hops) = &hops {
            write(dir.join("hops.svg"), hops)?;
        }
        let plots = [confusion, latency, throughput]
            .into_iter()
            .chain(hops)
            .collect::<Vec<_>>()
            .join("\n");
        write(dir.join("report.html"), &self.html(&plots))
    }

    fn html(&self, plots: &str) -> String {
        let text = escape(&self.to_text());
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>switchyard run {run}</title><style>body{{font-family:sans-serif;\
             max-width:1000px;margin:2em auto}} pre{{background:#f6f6f6;padding:1em}} \
             .plots{{display:flex;flex-wrap:wrap;gap:1em}}</style></head><body>\n\
             <h1>switchyard run {run}</h1>\n<pre>{text}</pre>\n<div class=\"plots\">\n\
             {plots}\n</div>\n</body></html>\n",
            run = escape(&self.run_id),
        )
    }

    /// The confusion matrix as a heat map: each cell's share of its row (its label).
    pub fn confusion_svg(&self) -> Result<String, ReportError> {
        let plot = "confusion matrix";
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (640, 560)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| plot_error(plot, e))?;
            let mut chart = ChartBuilder::on(&root)
                .caption("Confusion matrix (share of each label)", ("sans-serif", 20))
                .margin(10)
                .x_label_area_size(70)
                .y_label_area_size(100)
                .build_cartesian_2d((0i32..9).into_segmented(), (0i32..9).into_segmented())
                .map_err(|e| plot_error(plot, e))?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(10)
                .y_labels(10)
                .x_label_style(("sans-serif", 10))
                .y_label_style(("sans-serif", 11))
                .x_label_formatter(&|x| class_label(x, false))
                .y_label_formatter(&|y| class_label(y, true))
                .x_desc("predicted")
                .y_desc("label")
                .draw()
                .map_err(|e| plot_error(plot, e))?;
            let cells = (0..10).flat_map(|label| {
                let total: u64 = self.confusion[label].iter().sum();
                (0..10).map(move |predicted| (label, predicted, total))
            });
            let cells: Vec<(usize, usize, u64)> = cells.collect();
            chart
                .draw_series(cells.iter().map(|&(label, predicted, total)| {
                    let share = share(self.confusion[label][predicted], total);
                    // Rows from the top: label 0 first.
                    let (x, y) = (predicted as i32, 9 - label as i32);
                    Rectangle::new(
                        [
                            (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                            (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                        ],
                        heat(share).filled(),
                    )
                }))
                .map_err(|e| plot_error(plot, e))?;
            chart
                .draw_series(cells.iter().map(|&(label, predicted, total)| {
                    let count = self.confusion[label][predicted];
                    let colour = if share(count, total) > 0.5 {
                        WHITE
                    } else {
                        BLACK
                    };
                    let style = ("sans-serif", 12)
                        .into_font()
                        .color(&colour)
                        .pos(Pos::new(HPos::Center, VPos::Center));
                    Text::new(
                        count.to_string(),
                        (
                            SegmentValue::CenterOf(predicted as i32),
                            SegmentValue::CenterOf(9 - label as i32),
                        ),
                        style,
                    )
                }))
                .map_err(|e| plot_error(plot, e))?;
            root.present().map_err(|e| plot_error(plot, e))?;
        }
        Ok(svg)
    }

    /// The latencies as a histogram.
    pub fn latency_svg(&self) -> Result<String, ReportError> {
        let plot = "latency histogram";
        let top = self.latency_ms(1.0).unwrap_or(1.0).max(1e-3);
        let width = top / BINS as f64;
        let mut counts = vec![0u64; BINS];
        for &latency in &self.latencies_ms {
            let bin = ((latency / width) as usize).min(BINS - 1);
            counts[bin] += 1;
        }
        let highest = counts.iter().copied().max().unwrap_or(0).max(1);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (640, 400)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| plot_error(plot, e))?;
            let mut chart = ChartBuilder::on(&root)
                .caption("Latency, sent to stored", ("sans-serif", 20))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..top, 0u64..highest + highest / 10 + 1)
                .map_err(|e| plot_error(plot, e))?;
            chart
                .configure_mesh()
                .x_label_formatter(&|ms| format!("{ms:.0}"))
                .x_desc("ms")
                .y_desc("predictions")
                .draw()
                .map_err(|e| plot_error(plot, e))?;
            chart
                .draw_series(counts.iter().enumerate().map(|(bin, &count)| {
                    let x = bin as f64 * width;
                    Rectangle::new([(x, 0), (x + width, count)], BLUE.mix(0.6).filled())
                }))
                .map_err(|e| plot_error(plot, e))?;
            root.present().map_err(|e| plot_error(plot, e))?;
        }
        Ok(svg)
    }

    /// The longest wait at each hop among the requests sent in each slice of the run: a
    /// slow start, a stall or a hop that dominates shows where it happened. `None` without
    /// per-hop times.
    pub fn hops_svg(&self) -> Result<Option<String>, ReportError> {
        let plot = "per-hop plot";
        let Some(last) = self.hops.last() else {
            return Ok(None);
        };
        let end = last.sent_s.max(1e-3);
        let width = end / BINS as f64;
        let mut longest = [[0f64; BINS]; 3];
        for hop in &self.hops {
            let bin = ((hop.sent_s.max(0.0) / width) as usize).min(BINS - 1);
            for (series, value) in longest.iter_mut().zip(hop.values()) {
                series[bin] = series[bin].max(value);
            }
        }
        let highest = longest.iter().flatten().copied().fold(1.0, f64::max);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (640, 400)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| plot_error(plot, e))?;
            let mut chart = ChartBuilder::on(&root)
                .caption("Longest wait per hop, by send time", ("sans-serif", 20))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..end, 0f64..highest * 1.1)
                .map_err(|e| plot_error(plot, e))?;
            chart
                .configure_mesh()
                .x_desc("seconds from the first request (sent)")
                .y_label_formatter(&|ms| format!("{ms:.0}"))
                .y_desc("ms")
                .draw()
                .map_err(|e| plot_error(plot, e))?;
            for ((name, series), color) in Hops::NAMES.iter().zip(&longest).zip([BLUE, RED, GREEN])
            {
                let points = series
                    .iter()
                    .enumerate()
                    .map(|(bin, &ms)| ((bin as f64 + 0.5) * width, ms));
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))
                    .map_err(|e| plot_error(plot, e))?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| plot_error(plot, e))?;
            root.present().map_err(|e| plot_error(plot, e))?;
        }
        Ok(Some(svg))
    }

    /// Predictions stored per second over the run.
    pub fn throughput_svg(&self) -> Result<String, ReportError> {
        let plot = "throughput plot";
        let end = self.arrivals_s.last().copied().unwrap_or(0.0).max(1e-3);
        let width = end / BINS as f64;
        let mut counts = vec![0u64; BINS];
        for &at in &self.arrivals_s {
            counts[((at / width) as usize).min(BINS - 1)] += 1;
        }
        let rates: Vec<(f64, f64)> = counts
            .iter()
            .enumerate()
            .map(|(bin, &count)| ((bin as f64 + 0.5) * width, count as f64 / width))
            .collect();
        let highest = rates.iter().map(|r| r.1).fold(1.0, f64::max);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (640, 400)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| plot_error(plot, e))?;
            let mut chart = ChartBuilder::on(&root)
                .caption("Throughput over the run", ("sans-serif", 20))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..end, 0f64..highest * 1.1)
                .map_err(|e| plot_error(plot, e))?;
            chart
                .configure_mesh()
                .x_desc("seconds from the first request")
                .y_label_formatter(&|rate| format!("{rate:.0}"))
                .y_desc("predictions/s")
                .draw()
                .map_err(|e| plot_error(plot, e))?;
            chart
                .draw_series(LineSeries::new(rates, BLUE.stroke_width(2)))
                .map_err(|e| plot_error(plot, e))?;
            root.present().map_err(|e| plot_error(plot, e))?;
        }
        Ok(svg)
    }
}

fn latest(runs: &[RunInfo]) -> String {
    runs.iter()
        .take(5)
        .map(|r| format!("{} ({} predictions)", r.run_id, r.predictions))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plot_error<E: std::error::Error + Send + Sync + 'static>(
    plot: &'static str,
    error: E,
) -> ReportError {
    ReportError::Plot {
        plot,
        error: Box::new(error),
    }
}

fn share(count: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        count as f64 / total as f64
    }
}

/// White to dark blue.
fn heat(share: f64) -> RGBColor {
    let fade = |full: u8| (255.0 - (255.0 - f64::from(full)) * share.clamp(0.0, 1.0)) as u8;
    RGBColor(fade(8), fade(48), fade(107))
}

/// The class name under a cell of the confusion matrix; rows count from the top.
fn class_label(at: &SegmentValue<i32>, rows: bool) -> String {
    let SegmentValue::CenterOf(index) = *at else {
        return String::new();
    };
    let class = if rows { 9 - index } else { index };
    usize::try_from(class)
        .ok()
        .and_then(|class| CLASS_NAMES.get(class))
        .map_or(String::new(), |name| name.to_string())
}

fn short_name(class: usize) -> String {
    CLASS_NAMES[class].chars().take(5).collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_core::wire::{Prediction, Timings};

    /// A prediction sent at 1000 ms whose way took `latency` ms: a quarter to reach the
    /// classifier, a quarter in it, half to be stored.
    fn record(id: usize, class: usize, label: usize, latency: f64) -> PredictionRecord {
        let mut logits = [0.0f32; 10];
        logits[class] = 5.0;
        PredictionRecord {
            run_id: "r".into(),
            prediction: Prediction {
                handled_at_ms: Some(1000.0 + latency / 4.0),
                predicted_at_ms: Some(1000.0 + latency / 2.0),
                ..Prediction::from_logits(
                    format!("r-{id}"),
                    &logits,
                    Some(label),
                    Some(1000.0),
                    "lenet5-x".into(),
                    Timings {
                        decode_us: 1,
                        inference_us: 1,
                        batch: 1,
                    },
                )
            },
            component: Some("classifier@sha256:ab".into()),
            received_at_ms: 1000.0 + latency,
        }
    }

    #[test]
    fn a_report_holds_the_runs_numbers() {
        let records: Vec<PredictionRecord> = (0..100)
            .map(|i| {
                record(
                    i,
                    i % 10,
                    if i < 90 { i % 10 } else { (i + 1) % 10 },
                    i as f64,
                )
            })
            .collect();
        let report = RunReport::new("r".into(), "store".into(), &records);
        assert_eq!(report.summary.accuracy, Some(0.9));
        assert_eq!(report.confusion[0][0], 9);
        assert_eq!(report.confusion[1][0], 1);
        assert_eq!(report.latency_ms(0.5), Some(49.0));
        assert_eq!(report.latency_ms(1.0), Some(99.0));
        let text = report.to_text();
        assert!(text.contains("accuracy      90.00 %"), "{text}");
        assert!(
            text.contains("p99 98.0 ms · p99.9 99.0 ms · max 99.0 ms"),
            "{text}"
        );
        assert!(
            text.contains("lenet5-x by classifier@sha256:ab (100)"),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let page = report.write(dir.path()).unwrap();
        let html = std::fs::read_to_string(page).unwrap();
        assert!(html.contains("90.00 %") && html.contains("<svg"), "{html}");
        // Latencies 0..=99 ms: the hop into the classifier takes a quarter of each, so its
        // p99 is 98 / 4 and the slowest request's (99 ms) quarter is its mean over the slowest 1 %.
        let hops = report.hop_table().expect("per-hop times");
        assert_eq!(hops[0], [49.0 / 4.0, 98.0 / 4.0, 99.0 / 4.0, 99.0 / 4.0]);
        assert_eq!(hops[2], [49.0 / 2.0, 98.0 / 2.0, 99.0 / 2.0, 99.0 / 2.0]);
        assert!(text.contains("where the time went"), "{text}");
        for plot in ["confusion.svg", "latency.svg", "throughput.svg", "hops.svg"] {
            let svg = std::fs::read_to_string(dir.path().join(plot)).unwrap();
            assert!(svg.starts_with("<svg"), "{plot}: {svg}");
        }
    }
}
