//! The report as one self-contained HTML page: inline CSS and SVG, no scripts, no requests.

use super::{OperatingPoint, Quality, Report};
use crate::models::ISOLATION_FOREST;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.1}%", v * 100.0))
}

fn num3(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{v:.3}"))
}

/// A bar chart of labelled values as inline SVG; `mark` draws a vertical line at that x value
/// (histogram thresholds).
fn bars(values: &[(String, u64)], mark: Option<(f64, &[f64])>, color: &str) -> String {
    let (w, h, pad) = (640.0, 180.0, 28.0);
    let max = values.iter().map(|v| v.1).max().unwrap_or(0).max(1) as f64;
    let n = values.len().max(1) as f64;
    let bw = (w - 2.0 * pad) / n;
    let mut svg = format!(r#"<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">"#);
    svg += &format!(
        r##"<line x1="{pad}" y1="{y}" x2="{x2}" y2="{y}" stroke="#999"/>"##,
        y = h - pad,
        x2 = w - pad
    );
    for (i, (label, v)) in values.iter().enumerate() {
        let bh = (*v as f64 / max) * (h - 2.0 * pad);
        let x = pad + i as f64 * bw;
        svg += &format!(
            r#"<rect x="{x:.1}" y="{y:.1}" width="{bwm:.1}" height="{bh:.1}" fill="{color}"><title>{t}: {v}</title></rect>"#,
            y = h - pad - bh,
            bwm = (bw - 1.0).max(0.5),
            t = esc(label)
        );
    }
    if let (Some(first), Some(last)) = (values.first(), values.last()) {
        svg += &format!(
            r##"<text x="{pad}" y="{y}" font-size="11" fill="#555">{}</text>"##,
            esc(&first.0),
            y = h - 8.0
        );
        svg += &format!(
            r##"<text x="{x}" y="{y}" font-size="11" fill="#555" text-anchor="end">{}</text>"##,
            esc(&last.0),
            x = w - pad,
            y = h - 8.0
        );
    }
    svg += &format!(r##"<text x="{pad}" y="14" font-size="11" fill="#555">max {max}</text>"##);
    if let Some((at, edges)) = mark {
        if let (Some(lo), Some(hi)) = (edges.first(), edges.last()) {
            let step = if edges.len() > 1 {
                edges[1] - edges[0]
            } else {
                1.0
            };
            let frac = ((at - lo) / (hi + step - lo)).clamp(0.0, 1.0);
            let x = pad + frac * (w - 2.0 * pad);
            svg += &format!(
                r##"<line x1="{x:.1}" y1="{pad}" x2="{x:.1}" y2="{y}" stroke="#c0392b" stroke-width="2" stroke-dasharray="4 3"/><text x="{tx:.1}" y="{pad}" font-size="11" fill="#c0392b">threshold {at:.3}</text>"##,
                y = h - pad,
                tx = x + 4.0
            );
        }
    }
    svg + "</svg>"
}

fn quality_row(name: &str, q: &Quality) -> String {
    format!(
        "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        num3(q.precision),
        num3(q.recall),
        num3(q.f1),
        num3(q.roc_auc),
        num3(q.pr_auc),
        q.tp,
        q.fp,
        q.fn_,
        q.tn
    )
}

/// The report as one self-contained HTML page: inline CSS and SVG, no scripts, no requests.
/// The alert-budget table: what alerting on the top share of events would give.
fn operating_points(points: &[OperatingPoint]) -> String {
    let mut h = String::from(
        "<h3>Operating points</h3><p class=\"muted\">Events ranked by the policy's margin over the thresholds; alerting on the top share of them gives:</p><table><tr><th>alert share</th><th>alerts</th><th>alerts per day</th><th>margin at least</th><th>precision</th><th>recall</th></tr>",
    );
    for p in points {
        h += &format!(
            "<tr{}><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if p.shipped {
                " style=\"font-weight:bold\""
            } else {
                ""
            },
            pct(Some(p.alert_share)),
            if p.shipped { " (the thresholds)" } else { "" },
            p.alerts,
            p.alerts_per_day.map_or("–".into(), |d| format!("{d:.1}")),
            if p.margin.is_finite() {
                format!("{:.3}", p.margin)
            } else {
                "–".into()
            },
            num3(p.precision),
            num3(p.recall)
        );
    }
    h + "</table>"
}

pub fn to_html(r: &Report) -> String {
    let mut h = String::new();
    h += r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>vigil backtest</title><style>
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:980px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}h3{margin-top:1.4rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.kpi{display:inline-block;margin:0 1.5rem .5rem 0}.kpi b{display:block;font-size:1.4rem}.muted{color:#666}svg{max-width:100%;height:auto;display:block}
</style></head><body>"#;
    h += &format!(
        "<h1>vigil backtest</h1><p class=\"muted\">Input: {} · {} events</p>",
        esc(&r.input),
        r.events
    );
    if let Some(split) = &r.split {
        h += &format!(
            "<h2>Time split</h2><p>Trained on the {} events before <b>{}</b> (they also warmed the account state, unscored); scored the {} events from then on. Only those count below.</p>",
            split.training_events,
            esc(&split.train_until),
            split.scored_events
        );
        h += "<h3>Feature drift, training → scored</h3><p class=\"muted\">Population stability index over the training deciles: below 0.1 stable, up to 0.25 moderate, above that major.</p><table><tr><th>feature</th><th>PSI</th><th>drift</th></tr>";
        for d in &split.drift {
            h += &format!(
                "<tr><td>{}</td><td>{:.3}</td><td>{}</td></tr>",
                esc(&d.feature),
                d.psi,
                d.level
            );
        }
        h += "</table>";
    }
    for c in &r.comparisons {
        h += &format!(
            "<h2>Champion {} vs challenger {}</h2><table><tr><th></th><th>events</th></tr><tr><td>both alert</td><td>{}</td></tr><tr><td>only {}</td><td>{}</td></tr><tr><td>only {}</td><td>{}</td></tr></table>",
            esc(&c.champion),
            esc(&c.challenger),
            c.both_alert,
            esc(&c.champion),
            c.champion_only,
            esc(&c.challenger),
            c.challenger_only
        );
        if let Some(b) = &c.better_on_labels {
            h += &format!(
                "<p>Better on the labels (consensus F1, then PR-AUC): <b>{}</b></p>",
                esc(b)
            );
        }
        if !c.examples.is_empty() {
            h += "<h3>Disagreements (first 25)</h3><table><tr><th>transaction</th><th>partition/offset</th><th>label</th><th>champion</th><th>challenger</th></tr>";
            for e in &c.examples {
                h += &format!(
                    "<tr><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&e.transaction_id),
                    e.partition,
                    e.offset,
                    esc(e.label.as_deref().unwrap_or("")),
                    if e.champion_alert { "alert" } else { "–" },
                    if e.challenger_alert { "alert" } else { "–" }
                );
            }
            h += "</table>";
        }
    }
    for m in &r.models {
        h += &format!(
            "<h2>Model {} <span class=\"muted\">({}, policy {})</span></h2>",
            esc(&m.name),
            esc(&m.version),
            m.policy
        );
        let invalid: u64 = m.invalid.values().sum();
        h += &format!(
            "<div class=\"kpi\"><b>{}</b>valid events</div><div class=\"kpi\"><b>{}</b>invalid</div><div class=\"kpi\"><b>{}</b>alerts</div><div class=\"kpi\"><b>{}</b>alert rate</div>",
            m.valid,
            invalid,
            m.alerts,
            pct(m.alert_rate)
        );
        if let Some(l) = &m.labels {
            h += &format!(
                "<h3>Against the labels <span class=\"muted\">({} positives, {} negatives)</span></h3>",
                l.positives, l.negatives
            );
            h += "<table><tr><th>detector</th><th>precision</th><th>recall</th><th>F1</th><th>ROC-AUC</th><th>PR-AUC</th><th>TP</th><th>FP</th><th>FN</th><th>TN</th></tr>";
            h += &quality_row("isolation forest", &l.isolation_forest);
            h += &quality_row("LOF", &l.lof);
            h += &quality_row("consensus (alerts)", &l.consensus);
            h += "</table><h3>Recall per label</h3><table><tr><th>label</th><th>events</th><th>forest flagged</th><th>LOF flagged</th><th>alerted</th><th>recall</th></tr>";
            for (k, v) in &l.by_label {
                h += &format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(k),
                    v.events,
                    v.forest_flagged,
                    v.lof_flagged,
                    v.alerted,
                    pct(v.recall)
                );
            }
            h += "</table>";
            h += &operating_points(&l.operating_points);
        }
        if !m.strongest_alerts.is_empty() {
            h += "<h3>Strongest alerts and their reasons</h3><table><tr><th>transaction</th><th>account</th><th>event time</th><th>label</th><th>margin</th><th>reasons</th></tr>";
            for a in &m.strongest_alerts {
                h += &format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td style=\"text-align:left\">{}</td></tr>",
                    esc(&a.transaction_id),
                    esc(&a.account_id),
                    esc(&a.event_time),
                    esc(a.label.as_deref().unwrap_or("")),
                    a.margin,
                    esc(&a.reason)
                );
            }
            h += "</table>";
        }
        h += "<h3>Alerts over time (per day of event time)</h3>";
        h += &bars(&m.alerts_by_day, None, "#c0392b");
        h += &format!(
            "<h3>Agreement between the models</h3><table><tr><th></th><th>LOF flags</th><th>LOF does not</th></tr><tr><td>forest flags</td><td>{}</td><td>{}</td></tr><tr><td>forest does not</td><td>{}</td><td>{}</td></tr></table>",
            m.agreement.both, m.agreement.forest_only, m.agreement.lof_only, m.agreement.neither
        );
        for (name, hist) in &m.scores {
            h += &format!(
                "<h3>{} score distribution</h3>",
                if *name == ISOLATION_FOREST {
                    "Isolation forest"
                } else {
                    "LOF"
                }
            );
            let vals: Vec<(String, u64)> = hist
                .edges
                .iter()
                .zip(&hist.counts)
                .map(|(e, c)| (format!("{e}"), *c))
                .collect();
            h += &bars(&vals, Some((hist.threshold, &hist.edges)), "#2c7fb8");
        }
        h += "<h3>Features that drive alerts</h3>";
        h += &bars(&m.feature_drivers, None, "#8e44ad");
        h += "<table><tr><th>feature</th><th>alerts listing it</th></tr>";
        for (f, n) in &m.feature_drivers {
            h += &format!("<tr><td>{}</td><td>{n}</td></tr>", esc(f));
        }
        h += "</table><h3>Top accounts by alerts</h3><table><tr><th>account</th><th>alerts</th></tr>";
        for (a, n) in &m.top_accounts {
            h += &format!("<tr><td>{}</td><td>{n}</td></tr>", esc(a));
        }
        h += "</table>";
    }
    h += "</body></html>\n";
    h
}
