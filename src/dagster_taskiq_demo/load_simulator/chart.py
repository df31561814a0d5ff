"""verify's chart: queue depth against desired and running workers over time, with the faults
(a line for a kill or a restart, a band for a freeze or a partition) and the failures (attempts
abandoned, runs failed). Written as a PNG and as a self-contained HTML page (the same chart as
inline SVG, and the report's figures)."""

import html
import io
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use('Agg')  # no display: files only

import matplotlib.dates as mdates
import matplotlib.pyplot as plt

FAULT_COLOURS = {'kill': 'red', 'freeze': 'purple', 'partition': 'orange', 'db-restart': 'black'}


def _x(value: Any) -> float:
    """A time (datetime or ISO text) as the chart's x coordinate."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return float(mdates.date2num(moment))  # type: ignore[no-untyped-call]


def draw(document: dict[str, Any]) -> Any:
    """The chart of a verify report (as `verify.as_dict` gives it): a matplotlib figure."""
    figure, axes = plt.subplots(figsize=(12, 5), dpi=100)
    scaling = document['scaling']
    if scaling:
        at = [_x(row['at']) for row in scaling]
        axes.step(
            at, [r['visible'] + r['in_flight'] for r in scaling], where='post', label='queue depth'
        )
        axes.step(at, [r['desired'] for r in scaling], where='post', label='desired workers')
        axes.step(at, [r['running'] for r in scaling], where='post', label='running workers')
    seen: set[str] = set()
    for fault in document['faults']:
        colour = FAULT_COLOURS.get(fault['kind'], 'grey')
        label = None if fault['kind'] in seen else fault['kind']
        seen.add(fault['kind'])
        if fault['ended_at']:
            axes.axvspan(
                _x(fault['at']), _x(fault['ended_at']), color=colour, alpha=0.15, label=label
            )
        else:
            axes.axvline(_x(fault['at']), color=colour, linestyle='--', label=label)
    failures = [_x(at) for at in document.get('failure_times', [])]
    if failures:
        axes.plot(
            failures,
            [0] * len(failures),
            'x',
            color='red',
            markersize=9,
            label='attempt abandoned / run failed',
        )
    axes.set_title(f'dagster-taskiq load: {document["scope"]}')
    axes.xaxis.set_major_formatter(mdates.DateFormatter('%H:%M:%S'))  # type: ignore[no-untyped-call]
    axes.set_xlabel('time (UTC)')
    axes.set_ylabel('messages / workers')
    axes.legend(loc='upper right', fontsize='small')
    figure.autofmt_xdate()
    figure.tight_layout()
    return figure


def write_chart(document: dict[str, Any], prefix: Path) -> tuple[Path, Path]:
    """`<prefix>.png` and `<prefix>.html`; their paths."""
    figure = draw(document)
    png, page = prefix.with_suffix('.png'), prefix.with_suffix('.html')
    try:
        figure.savefig(png)
        svg = io.StringIO()
        figure.savefig(svg, format='svg')
    finally:
        plt.close(figure)
    rows = ''.join(
        f'<tr><td>{html.escape(str(name))}</td><td>{html.escape(str(value))}</td></tr>'
        for section in ('runs_by_status', 'counts', 'failures')
        for name, value in document[section].items()
    )
    verdict = 'VERIFIED' if document['verified'] else 'FAILED'
    page.write_text(
        '<!doctype html><html><head><meta charset="utf-8">'
        f'<title>verify: {html.escape(document["scope"])}</title></head><body>'
        f'<h1>verify: {html.escape(document["scope"])}: {verdict}</h1>'
        f'{svg.getvalue().split("?>", 1)[-1]}'
        f'<table border="1" cellpadding="4">{rows}</table></body></html>\n'
    )
    return png, page
