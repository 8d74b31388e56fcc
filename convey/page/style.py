"""The page's CSS: readable on a desktop, nothing cut off at phone width (wide tables scroll inside their box)."""

STYLE = """
:root{--up:#1b7f3a;--down:#c62828;--drain:#b26a00;--maint:#6a3fb5;--muted:#666;--line:#ddd}
*{box-sizing:border-box}
[hidden]{display:none!important}
body{font-family:system-ui,sans-serif;margin:0 auto;padding:0 1rem 2rem;max-width:90rem;color:#222}
h1{font-size:1.4rem;margin:.8rem 0 .2rem}
h2{font-size:1.1rem;margin:1.4rem 0 .4rem}
h3{font-size:1rem;margin:1rem 0 .3rem}
.status{margin:0;color:var(--muted);font-size:.9rem;overflow-wrap:anywhere}
.dot{display:inline-block;width:.7em;height:.7em;border-radius:50%;background:#aaa}
.dot.ok{background:var(--up)}.dot.stale{background:var(--down)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(9.5rem,1fr));gap:.5rem;margin-top:.8rem}
.card{border:1px solid var(--line);border-radius:6px;padding:.4rem .6rem;min-width:0}
.card .v{font-size:1.25rem;font-weight:600;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.card .k{font-size:.8rem;color:var(--muted)}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.9rem}
th,td{padding:.25rem .6rem;text-align:left;border-bottom:1px solid var(--line);white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.wrap{white-space:normal;overflow-wrap:anywhere;min-width:10rem}
th{font-weight:600;background:#f4f4f4}
.state{font-weight:700;padding:.05rem .45rem;border-radius:4px;color:#fff;background:#888}
.state-up{background:var(--up)}.state-down{background:var(--down)}
.state-draining,.state-removed-draining{background:var(--drain)}.state-maintenance{background:var(--maint)}
.note{color:var(--muted);font-size:.9rem;overflow-wrap:anywhere;margin:.3rem 0}
.error{color:var(--down)}
.api form{display:flex;flex-wrap:wrap;gap:.4rem;align-items:center;margin:.3rem 0}
.actions-col{display:none}body.api-on .actions-col{display:table-cell}
.actions{display:flex;gap:.25rem;align-items:center}
.actions input{width:5.5em}
button{font:inherit;font-size:.85rem;padding:.1rem .5rem}
footer{margin-top:2rem;color:var(--muted)}
"""
