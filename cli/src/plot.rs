//! `zcio bench --sweep ... --plot FILE.svg`: throughput and p99 latency against the swept
//! value, one line per mode and per baseline, drawn with plotters' SVG backend.
//!
//! The swept values are placed evenly (index on the x axis, labelled with the value): the
//! usual sweeps double at each step, so that is a log scale without gaps. Latency is on a
//! log scale, since it spans orders of magnitude across an iodepth sweep.

use std::path::Path;

use plotters::prelude::*;

use crate::bench::{rows, BenchArgs, Point};
use crate::AnyResult;

/// Line colours, distinct on white (no yellow).
const COLORS: [RGBColor; 8] = [
    RGBColor(228, 26, 28),
    RGBColor(55, 126, 184),
    RGBColor(77, 175, 74),
    RGBColor(152, 78, 163),
    RGBColor(255, 127, 0),
    RGBColor(0, 0, 0),
    RGBColor(166, 86, 40),
    RGBColor(247, 129, 191),
];

/// One series: a name and, per swept value, (MB/s, p99 in microseconds).
type Series = (String, Vec<(f64, f64)>);

/// Draws the sweep into an SVG file at `path`.
pub(crate) fn draw(
    path: &Path,
    axis: &str,
    a: &BenchArgs,
    swept: &[Point],
    show: impl Fn(usize) -> String,
) -> AnyResult<()> {
    if swept.is_empty() {
        return Err("nothing to plot".into());
    }
    let labels: Vec<String> = swept.iter().map(|(v, _)| show(*v)).collect();
    let mut series: Vec<Series> = Vec::new();
    for (_, runs) in swept {
        for r in rows(runs) {
            match series.iter_mut().find(|(n, _)| *n == r.name) {
                Some((_, pts)) => pts.push((r.mbps, r.p99)),
                None => series.push((r.name.clone(), vec![(r.mbps, r.p99)])),
            }
        }
    }
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!("zcio bench: {}", a.describe(axis));
    let root = root
        .titled(&title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(600);
    let n = labels.len();
    let x_range = -0.25f64..(n as f64 - 0.75).max(0.25);
    let fmt_x = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 0.01 && i >= 0.0 {
            labels.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let max_mb = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(1.0f64, f64::max);
    let lat: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .filter(|v| *v > 0.0)
        .collect();
    let lat_lo = lat.iter().copied().fold(f64::MAX, f64::min).min(1e9) / 1.5;
    let lat_hi = lat.iter().copied().fold(1.0f64, f64::max) * 1.5;

    let mut thr = ChartBuilder::on(&left)
        .caption("throughput (MB/s, median)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range.clone(), 0f64..max_mb * 1.1)
        .map_err(|e| err(&e))?;
    thr.configure_mesh()
        .x_desc(axis)
        .y_desc("MB/s")
        .x_labels(4 * n + 1)
        .x_label_formatter(&fmt_x)
        .draw()
        .map_err(|e| err(&e))?;
    let mut lat_chart = ChartBuilder::on(&right)
        .caption("p99 latency (us, median, log scale)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, (lat_lo.max(0.1)..lat_hi.max(1.0)).log_scale())
        .map_err(|e| err(&e))?;
    lat_chart
        .configure_mesh()
        .x_desc(axis)
        .y_desc("us")
        .x_labels(4 * n + 1)
        .x_label_formatter(&fmt_x)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()].to_rgba();
        // Baselines in thinner lines.
        let raw = name.starts_with("raw-");
        let style = color.stroke_width(if raw { 1 } else { 2 });
        let xy = |f: fn(&(f64, f64)) -> f64| -> Vec<(f64, f64)> {
            pts.iter()
                .enumerate()
                .map(|(k, p)| (k as f64, f(p)))
                .collect()
        };
        let t = xy(|p| p.0);
        thr.draw_series(LineSeries::new(t.clone(), style))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        thr.draw_series(t.iter().map(|&p| Circle::new(p, 3, style.filled())))
            .map_err(|e| err(&e))?;
        let l: Vec<(f64, f64)> = xy(|p| p.1).into_iter().filter(|p| p.1 > 0.0).collect();
        lat_chart
            .draw_series(LineSeries::new(l.clone(), style))
            .map_err(|e| err(&e))?;
        lat_chart
            .draw_series(l.iter().map(|&p| Circle::new(p, 3, style.filled())))
            .map_err(|e| err(&e))?;
    }
    thr.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
