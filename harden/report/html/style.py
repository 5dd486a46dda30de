"""How the page looks: colours, matplotlib settings, the CSS."""

#: Colours of the variants apply measures (and of simulate's one model).
VARIANT_COLOURS = {"int8": "#d95f02", "int8+clip": "#7570b3", "hardened": "#1b9e77", "model": "#1f77b4"}
_PALETTE = ("#1f77b4", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
_VERDICT_COLOURS = {"helps": "#1b9e77", "hurts": "#d62728", "no measurable effect": "#9e9e9e"}


_RC = {
    "svg.fonttype": "path",  # glyphs as paths: the page looks the same without the fonts installed
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e3e3e3",
    "grid.linewidth": 0.6,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": 100,
}


_CSS = """
:root{--fg:#1d2329;--muted:#5b6670;--line:#dde2e6;--bg:#ffffff;--head:#f4f6f8;--accent:#1b9e77}
*{box-sizing:border-box}
body{margin:0;background:#eef1f4;color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px;background:var(--bg);min-height:100vh}
header h1{margin:0 0 4px;font-size:24px}
header .sub{color:var(--muted);margin:0 0 12px}
h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:15px;margin:20px 0 8px}
nav{margin:10px 0 6px;font-size:13px}
nav a{color:#2a6496;text-decoration:none;margin-right:14px;white-space:nowrap}
nav a:hover{text-decoration:underline}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0 4px}
.card{flex:1 1 170px;border:1px solid var(--line);border-radius:6px;padding:10px 14px;background:var(--head)}
.card .v{font-size:24px;font-weight:600;font-variant-numeric:tabular-nums}
.card .k{color:var(--muted);font-size:12px}
.card.good .v{color:#13795b}.card.bad .v{color:#b3401b}
.scroll{overflow-x:auto;margin:6px 0 12px}
table{border-collapse:collapse;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;vertical-align:top}
thead th{background:var(--head);font-weight:600;position:sticky;top:0}
tbody tr:nth-child(even) td{background:#fafbfc}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.num{white-space:nowrap}
table.kv tbody tr td{background:none}
table.kv th{background:none;font-weight:600;color:var(--muted);white-space:nowrap;padding-right:18px}
table.kv table.kv th,table.kv table.kv td{border:none;padding:1px 8px 1px 0}
code{font:12px/1.3 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;overflow-wrap:anywhere}
td code.label{white-space:nowrap;overflow-wrap:normal}
table.wide{font-size:12.5px}table.wide th,table.wide td{padding:4px 7px}
figure.plot{margin:12px 0 20px;text-align:center}
figure.plot svg{max-width:100%;height:auto}
figcaption{color:var(--muted);font-size:12.5px;margin-top:4px;text-align:left}
.note{color:var(--muted);font-size:12.5px}
.ci{color:var(--muted);font-size:11.5px}
.nw{white-space:nowrap}
.badge{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;color:#fff;white-space:nowrap}
.helps{background:#1b9e77}.hurts{background:#d62728}.none{background:#9e9e9e}
details{margin:6px 0;border:1px solid var(--line);border-radius:5px;padding:4px 10px}
details>summary{cursor:pointer;font-weight:600}
footer{margin-top:40px;color:var(--muted);font-size:12px;border-top:1px solid var(--line);padding-top:8px}
@media print{body{background:#fff}main{max-width:none;padding:0}nav{display:none}details{border:none}}
"""
