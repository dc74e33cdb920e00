//! A sweep's plots, each as SVG and PNG: throughput against every swept
//! dimension, scaling efficiency against ranks (when ranks are swept) and
//! the step-time split as stacked bars.
//!
//! Text is drawn with an embedded DejaVu Sans (Bitstream Vera licence,
//! launcher/assets/DejaVu-LICENSE.txt) through ab_glyph, so neither format
//! needs fontconfig, freetype or any font installed. It is proportional: a
//! monospaced font gives '.' and '(' a whole digit's width, which read as
//! gaps ("3500. 0"). Colours are Okabe and Ito's palette, told apart with
//! the common colour-vision deficiencies.

use crate::experiments::sweep::grid::Grid;
use crate::experiments::sweep::results::PointResult;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

static FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");
const SIZE: (u32, u32) = (900, 560);

/// Okabe and Ito's colour-blind-safe palette ("Color Universal Design",
/// 2008), black left out for the lines and bars: blue, orange, bluish
/// green, vermillion, reddish purple, sky blue, yellow.
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(213, 94, 0),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(240, 228, 66),
];

/// Title, axis description and tick label sizes (pixels).
const TITLE: u32 = 20;
const AXIS: u32 = 16;
const TICKS: u32 = 13;

/// Reads one part of the step split from a row.
type Part = fn(&PointResult) -> Option<f64>;

/// One line of a line chart: its legend and (x position, y) points.
type Series = (String, Vec<(usize, f64)>);

/// Draws every plot into `out` and returns the files written.
pub fn draw(out: &Path, grid: &Grid, rows: &[PointResult]) -> Result<Vec<PathBuf>> {
    register_font()?;
    let ok: Vec<&PointResult> = rows.iter().filter(|r| r.ok()).collect();
    let mut files = Vec::new();
    if ok.is_empty() {
        return Ok(files);
    }
    for dim in &grid.dims {
        let keys: Vec<&str> = dim.iter().map(|&a| grid.axes[a].key.as_str()).collect();
        let (ticks, series) = by_dimension(grid, &keys, &ok, |r| r.tokens_per_s);
        let title = format!("throughput against {}", keys.join(" / "));
        let name = format!("throughput_vs_{}", keys[0]);
        let plot = Plot::Line {
            title: &title,
            x_desc: &keys.join(" / "),
            y_desc: "tokens/s",
            ticks: &ticks,
            series: &series,
            ideal: false,
        };
        files.extend(both(out, &name, &plot)?);
    }
    if let Some(dim) = grid.dims.iter().find(|d| d.iter().any(|&a| grid.axes[a].key == "parallel.ranks")) {
        let keys: Vec<&str> = dim.iter().map(|&a| grid.axes[a].key.as_str()).collect();
        let (ticks, series) = efficiency(grid, &keys, &ok);
        let kind = scaling_kind(&ok);
        let title = format!("{kind} scaling efficiency: tokens/s(N) x N0 / (N x tokens/s(N0))");
        let y_desc = "efficiency (1 = ideal)";
        let plot = Plot::Line {
            title: &title,
            x_desc: &keys.join(" / "),
            y_desc,
            ticks: &ticks,
            series: &series,
            ideal: true,
        };
        files.extend(both(out, "scaling_efficiency", &plot)?);
    }
    files.extend(both(out, "step_split", &Plot::Split { grid, rows: &ok })?);
    Ok(files)
}

fn register_font() -> Result<()> {
    for style in [FontStyle::Normal, FontStyle::Bold, FontStyle::Italic, FontStyle::Oblique] {
        plotters::style::register_font("sans-serif", style, FONT)
            .map_err(|_| anyhow!("the embedded font does not load"))?;
    }
    Ok(())
}

/// What one chart shows; drawn once per backend.
enum Plot<'a> {
    Line {
        title: &'a str,
        x_desc: &'a str,
        y_desc: &'a str,
        ticks: &'a [String],
        series: &'a [Series],
        ideal: bool,
    },
    Split {
        grid: &'a Grid,
        rows: &'a [&'a PointResult],
    },
    /// Predicted (y) against measured (x), one series per quantity, with
    /// the line where they agree.
    Agreement {
        title: &'a str,
        series: &'a [(String, Vec<(f64, f64)>)],
    },
}

/// Draws predicted against measured milliseconds (`series`: legend and
/// (measured, predicted) pairs) as `<name>.svg` and `<name>.png` in `out`.
pub fn agreement(out: &Path, name: &str, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<Vec<PathBuf>> {
    register_font()?;
    both(out, name, &Plot::Agreement { title, series })
}

fn render<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, plot: &Plot) -> Result<()> {
    match *plot {
        Plot::Line { title, x_desc, y_desc, ticks, series, ideal } => {
            line_chart(area, title, x_desc, y_desc, ticks, series, ideal)
        }
        Plot::Split { grid, rows } => step_split(area, grid, rows),
        Plot::Agreement { title, series } => agreement_chart(area, title, series),
    }
}

/// Log-log scatter of predicted against measured, with y = x and the
/// 20% band either side of it.
fn agreement_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| anyhow!("cannot draw {title}: {e}");
    area.fill(&WHITE).map_err(|e| fail(&e))?;
    let all = series.iter().flat_map(|(_, p)| p.iter().flat_map(|&(x, y)| [x, y])).filter(|v| *v > 0.0);
    let (lo, hi) = all.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo / 1.5, hi * 1.5) } else { (0.01, 1.0) };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", TITLE))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(85)
        .build_cartesian_2d((lo..hi).log_scale(), (lo..hi).log_scale())
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("measured (ms per step)")
        .y_desc("predicted (ms per step)")
        .axis_desc_style(("sans-serif", AXIS))
        .label_style(("sans-serif", TICKS))
        .light_line_style(BLACK.mix(0.05))
        .x_label_formatter(&|v| tick_number(*v))
        .y_label_formatter(&|v| tick_number(*v))
        .draw()
        .map_err(|e| fail(&e))?;
    for (factor, style) in [(1.0, BLACK.mix(0.5)), (1.2, BLACK.mix(0.15)), (1.0 / 1.2, BLACK.mix(0.15))] {
        chart.draw_series(LineSeries::new([(lo, lo * factor), (hi, hi * factor)], style)).map_err(|e| fail(&e))?;
    }
    for (i, (legend, points)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()].to_rgba();
        let shown = points.iter().filter(|p| p.0 > 0.0 && p.1 > 0.0).map(|&p| Circle::new(p, 5, color.filled()));
        chart
            .draw_series(shown)
            .map_err(|e| fail(&e))?
            .label(legend.as_str())
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft).map_err(|e| fail(&e))
}

/// The legend box of every chart, at `position`.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .label_font(("sans-serif", TICKS + 1))
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

/// Draws one plot as `<name>.svg` and `<name>.png`.
fn both(out: &Path, name: &str, plot: &Plot) -> Result<Vec<PathBuf>> {
    let svg = out.join(format!("{name}.svg"));
    let png = out.join(format!("{name}.png"));
    {
        let area = SVGBackend::new(&svg, SIZE).into_drawing_area();
        render(&area, plot)?;
        area.present().map_err(|e| anyhow!("cannot write {}: {e}", svg.display()))?;
    }
    {
        let area = BitMapBackend::new(&png, SIZE).into_drawing_area();
        render(&area, plot)?;
        area.present().map_err(|e| anyhow!("cannot write {}: {e}", png.display()))?;
    }
    Ok(vec![svg, png])
}

/// Text of a row's values for `keys`, joined as in axis labels.
fn values_of(row: &PointResult, keys: &[&str]) -> String {
    keys.iter().map(|k| row.values.get(*k).map_or("", |v| v.as_str())).collect::<Vec<_>>().join(" / ")
}

/// The other axes' values of a row, and whether it was predicted: its line's legend.
fn others_of(grid: &Grid, keys: &[&str], row: &PointResult) -> String {
    let others: Vec<String> = grid
        .axes
        .iter()
        .filter(|a| !keys.contains(&a.key.as_str()))
        .map(|a| format!("{}={}", a.key, row.values.get(&a.key).map_or("", |v| v.as_str())))
        .collect();
    match (others.is_empty(), row.source.as_str()) {
        (true, source) => source.to_string(),
        (false, "measured") => others.join(" "),
        (false, source) => format!("{} ({source})", others.join(" ")),
    }
}

/// Ticks = the dimension's values in grid order; one series per combination of the other axes.
fn by_dimension(
    grid: &Grid,
    keys: &[&str],
    rows: &[&PointResult],
    y: impl Fn(&PointResult) -> Option<f64>,
) -> (Vec<String>, Vec<Series>) {
    let first = grid.axes.iter().position(|a| a.key == keys[0]).expect("a swept key");
    let ticks: Vec<String> = (0..grid.axes[first].values.len())
        .map(|v| {
            keys.iter()
                .map(|k| {
                    grid.axes
                        .iter()
                        .find(|a| a.key == *k)
                        .map_or(String::new(), |a| crate::experiments::sweep::grid::plain_text(&a.values[v]))
                })
                .collect::<Vec<_>>()
                .join(" / ")
        })
        .collect();
    let mut series: Vec<Series> = Vec::new();
    for row in rows {
        let (Some(x), Some(y)) = (ticks.iter().position(|t| *t == values_of(row, keys)), y(row)) else { continue };
        let legend = others_of(grid, keys, row);
        match series.iter_mut().find(|(l, _)| *l == legend) {
            Some((_, points)) => points.push((x, y)),
            None => series.push((legend, vec![(x, y)])),
        }
    }
    (ticks, series)
}

/// Efficiency per line: tokens/s(N) x N0 / (N x tokens/s(N0)), N0 = the line's fewest ranks.
fn efficiency(grid: &Grid, keys: &[&str], rows: &[&PointResult]) -> (Vec<String>, Vec<Series>) {
    let (ticks, throughput) = by_dimension(grid, keys, rows, |r| r.tokens_per_s);
    let (_, ranks) = by_dimension(grid, keys, rows, |r| r.ranks.map(|n| n as f64));
    let series = throughput
        .into_iter()
        .zip(ranks)
        .map(|((legend, tps), (_, ranks))| {
            let base = tps.iter().zip(&ranks).min_by(|a, b| a.1 .1.total_cmp(&b.1 .1)).map(|(t, n)| (t.1, n.1));
            let points = match base {
                Some((tps0, n0)) => tps.iter().zip(&ranks).map(|(t, n)| (t.0, t.1 * n0 / (n.1 * tps0))).collect(),
                None => Vec::new(),
            };
            (legend, points)
        })
        .collect();
    (ticks, series)
}

/// "weak" when the global batch grew with the ranks, "strong" when it stayed the same.
pub fn scaling_kind(rows: &[&PointResult]) -> &'static str {
    let pairs: Vec<(f64, f64)> = rows.iter().filter_map(|r| Some((r.ranks? as f64, r.tokens_per_step?))).collect();
    let Some(&(n0, t0)) = pairs.iter().min_by(|a, b| a.0.total_cmp(&b.0)) else { return "scaling" };
    let close = |a: f64, b: f64| (a - b).abs() <= 0.01 * b.abs();
    if pairs.iter().all(|&(_, t)| close(t, t0)) {
        "strong"
    } else if pairs.iter().all(|&(n, t)| close(t / t0, n / n0)) {
        "weak"
    } else {
        "mixed"
    }
}

fn line_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    ticks: &[String],
    series: &[Series],
    ideal_at_one: bool,
) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| anyhow!("cannot draw {title}: {e}");
    area.fill(&WHITE).map_err(|e| fail(&e))?;
    let top =
        series.iter().flat_map(|(_, p)| p.iter().map(|p| p.1)).fold(if ideal_at_one { 1.0 } else { 0.0 }, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", TITLE))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(85)
        .build_cartesian_2d((0..ticks.len().max(1) - 1).into_segmented(), 0.0..top * 1.15)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .axis_desc_style(("sans-serif", AXIS))
        .label_style(("sans-serif", TICKS))
        .light_line_style(BLACK.mix(0.05))
        .y_label_formatter(&|v| tick_number(*v))
        .x_labels(ticks.len() + 1)
        .x_label_formatter(&|v| segment_label(v, ticks))
        .draw()
        .map_err(|e| fail(&e))?;
    if ideal_at_one {
        chart
            .draw_series(LineSeries::new([(SegmentValue::Exact(0), 1.0), (SegmentValue::Last, 1.0)], BLACK.mix(0.4)))
            .map_err(|e| fail(&e))?
            .label("ideal")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
    }
    for (i, (legend, points)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()].to_rgba();
        let xy: Vec<(SegmentValue<usize>, f64)> = points.iter().map(|&(x, y)| (SegmentValue::CenterOf(x), y)).collect();
        chart.draw_series(LineSeries::new(xy.clone(), color.stroke_width(2))).map_err(|e| fail(&e))?;
        chart
            .draw_series(xy.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(|e| fail(&e))?
            .label(legend.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight).map_err(|e| fail(&e))
}

/// Stacked bars per point: compute, exposed communication, other (ms).
fn step_split<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, grid: &Grid, rows: &[&PointResult]) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| anyhow!("cannot draw the step split: {e}");
    let keys: Vec<&str> = grid.axes.iter().map(|a| a.key.as_str()).collect();
    // Predicted bars say so (measured and predicted points may share the chart).
    let ticks: Vec<String> = rows
        .iter()
        .map(|r| {
            let values = keys.iter().map(|k| r.values.get(*k).map_or("", |v| v.as_str())).collect::<Vec<_>>();
            let mark = if r.source == "measured" { "" } else { " p" };
            format!("{}{mark}", values.join(", "))
        })
        .collect();
    let ms = |v: Option<f64>| v.unwrap_or(0.0) * 1e3;
    let top = rows
        .iter()
        .map(|r| ms(r.step_s).max(ms(r.compute_s) + ms(r.exposed_comm_s) + ms(r.other_s)))
        .fold(0.0, f64::max);
    area.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(area)
        .caption("step time split (slowest rank; p = predicted)", ("sans-serif", TITLE))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(85)
        .build_cartesian_2d((0..rows.len().max(1) - 1).into_segmented(), 0.0..top * 1.2)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(keys.join(", "))
        .y_desc("ms per step")
        .axis_desc_style(("sans-serif", AXIS))
        .label_style(("sans-serif", TICKS))
        .light_line_style(BLACK.mix(0.05))
        .y_label_formatter(&|v| tick_number(*v))
        .x_labels(rows.len() + 1)
        .x_label_formatter(&|v| segment_label(v, &ticks))
        .draw()
        .map_err(|e| fail(&e))?;
    let parts: [(&str, RGBColor, Part); 3] = [
        ("compute (without all-to-all)", PALETTE[0], |r| r.compute_s),
        ("exposed communication (all-to-all + grad sync)", PALETTE[1], |r| r.exposed_comm_s),
        ("other (data, optimizer, metrics)", RGBColor(150, 150, 150), |r| r.other_s),
    ];
    for (p, &(name, color, part)) in parts.iter().enumerate() {
        let bars = rows.iter().enumerate().map(|(i, r)| {
            let base: f64 = parts[..p].iter().map(|q| ms((q.2)(r))).sum();
            let mut bar = Rectangle::new(
                [(SegmentValue::Exact(i), base), (SegmentValue::Exact(i + 1), base + ms(part(r)))],
                color.filled(),
            );
            bar.set_margin(0, 0, 8, 8);
            bar
        });
        chart
            .draw_series(bars)
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft).map_err(|e| fail(&e))
}

/// A tick's number as people write it: 25M, 120k, 3500, 12.5, 0.85, 5
/// (no trailing zeros, so one axis does not mix 5.00 and 10.0).
fn tick_number(v: f64) -> String {
    let a = v.abs();
    let (number, unit) = if a >= 1e6 {
        (format!("{:.1}", v / 1e6), "M")
    } else if a >= 1e4 {
        (format!("{:.0}", v / 1e3), "k")
    } else if a >= 100.0 {
        (format!("{v:.0}"), "")
    } else if a >= 10.0 {
        (format!("{v:.1}"), "")
    } else {
        (format!("{v:.2}"), "")
    };
    let trimmed = if number.contains('.') { number.trim_end_matches('0').trim_end_matches('.') } else { &number };
    format!("{trimmed}{unit}")
}

fn segment_label(v: &SegmentValue<usize>, ticks: &[String]) -> String {
    match v {
        SegmentValue::CenterOf(i) => ticks.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::tick_number;

    #[test]
    fn ticks_read_as_people_write_numbers() {
        let ticks = [0.0, 5.0, 10.0, 12.5, 0.85, 3500.0, 120_000.0, 25_000_000.0, 2_500_000.0, -2.5];
        let want = ["0", "5", "10", "12.5", "0.85", "3500", "120k", "25M", "2.5M", "-2.5"];
        assert_eq!(ticks.map(tick_number), want);
    }
}
