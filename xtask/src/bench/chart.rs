//! The chart: connection rate against the number of Services, per method, for 1 and for N
//! clients. Drawn with plotters' bitmap backend and a font compiled into xtask (no system fonts).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{
    coord::Shift,
    prelude::*,
    style::{FontStyle, register_font},
};

use super::report::{Report, method_label};

const FONT: &str = "sans-serif";

/// (method, color, drawn as a line over Service counts or as a flat reference line).
const SERIES: [(&str, RGBColor, bool); 4] = [
    ("tagger", RGBColor(0x1f, 0x77, 0xb4), false),
    ("iptables", RGBColor(0xd6, 0x27, 0x28), false),
    ("direct", RGBColor(0x55, 0x55, 0x55), false),
    ("haproxy", RGBColor(0xff, 0x7f, 0x0e), true),
];

/// Writes the PNG.
pub fn draw(report: &Report, path: &Path) -> Result<()> {
    // Registering twice (a second chart in one process) is harmless.
    let _ = register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT);
    let root = BitMapBackend::new(path, (1400, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("chart: {e}"))?;
    let (title, body) = root.split_vertically(50);
    title
        .draw_text(
            "tagger: new connections per second (TCP_CRR) against the number of Services",
            &(FONT, 26).into_font().color(&BLACK),
            (20, 14),
        )
        .map_err(|e| anyhow!("chart: {e}"))?;
    let (left, right) = body.split_horizontally(700);
    panel(report, &left, 1)?;
    panel(report, &right, report.clients())?;
    root.present().map_err(|e| anyhow!("chart {}: {e}", path.display()))?;
    Ok(())
}

fn panel(report: &Report, area: &DrawingArea<BitMapBackend<'_>, Shift>, clients: usize) -> Result<()> {
    let crr = report.crr();
    let all_levels = crr.levels("tagger");
    let max_services = f64::from(all_levels.last().copied().unwrap_or(65_536)).max(10.0);
    let mut top: f64 = 1.0;
    for (method, _, _) in SERIES {
        for l in crr.levels(method) {
            if let Some(c) = crr.cell(method, l, clients) {
                top = top.max(c.rate);
            }
        }
    }
    let caption = if clients == 1 { "1 client".to_owned() } else { format!("{clients} parallel clients") };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((0.8f64..max_services * 1.6).log_scale(), 0f64..top * 1.15)
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("Services (log scale)")
        .y_desc("connections per second")
        .x_label_formatter(&|v| thousands(*v))
        .y_label_formatter(&|v| thousands(*v))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    for (method, color, flat) in SERIES {
        let mut points: Vec<(f64, f64)> = crr
            .levels(method)
            .into_iter()
            .filter_map(|l| crr.cell(method, l, clients).map(|c| (f64::from(l), c.rate)))
            .collect();
        if points.is_empty() {
            continue;
        }
        if flat {
            // Measured once: its cost does not depend on the Services (a reference line).
            let rate = points[0].1;
            points = vec![(0.8, rate), (max_services * 1.6, rate)];
        }
        let style = ShapeStyle { color: color.to_rgba(), filled: true, stroke_width: 3 };
        let label = method_label(method);
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(|e| anyhow!("chart: {e}"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        if !flat {
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 5, style)))
                .map_err(|e| anyhow!("chart: {e}"))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    Ok(())
}

fn thousands(v: f64) -> String {
    if v >= 1000.0 && (v / 1000.0).fract() == 0.0 {
        format!("{}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}
