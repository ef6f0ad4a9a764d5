// The charts, drawn with uPlot (vendored: vendor/uPlot.esm.js, uPlot 1.6.32
// from npm, MIT): each turn's time to first token per character; the prompt
// tokens each turn reused from the cache against those llama-server had to
// evaluate (with totals per character); saves and restores over time with
// their size and duration; and the save directory's size on disk.
//
// Fed by events (`generation_finished`, `saved`, `restored`) and by
// /health's `disk`, from the moment the page opened. Each chart's container
// carries `data-points`, the number of points it draws.

import uPlot from './vendor/uPlot.esm.js';
import { byId, fill, h } from './dom.js';
import { bytes, count, ms } from './format.js';

const HEIGHT = 190;
const MAX_POINTS = 2000; // per chart, oldest dropped first

const turns = []; // {t, character, ttft, cached, evaluated}
const io = [];    // {t, kind: 'save' | 'restore', ms, bytes, tokens}
const disk = [];  // {t, bytes}

const charts = new Map(); // id → {u, build}
let drawQueued = false;

/** The page's colors, from its CSS (they follow the light/dark scheme). */
function theme() {
    const css = getComputedStyle(document.documentElement);
    const v = (name) => css.getPropertyValue(name).trim();
    return {
        fg: v('--muted'),
        grid: v('--grid'),
        series: [1, 2, 3, 4, 5, 6].map((i) => v(`--c${i}`)),
    };
}

const now = () => Date.now() / 1000;

function push(list, item) {
    list.push(item);
    if (list.length > MAX_POINTS) {
        list.shift();
    }
    queueDraw();
}

/** Takes in one kvgate event. */
export function onEvent(ev) {
    const t = (ev.time_ms ?? Date.now()) / 1000;
    switch (ev.type) {
    case 'generation_finished':
        push(turns, {
            t,
            character: ev.character ?? null,
            ttft: ev.ttft_ms ?? null,
            cached: ev.cache_n ?? null,
            evaluated: ev.prompt_n ?? null,
        });
        break;
    case 'saved':
        push(io, { t, kind: 'save', ms: ev.ms, bytes: ev.bytes, tokens: ev.tokens });
        break;
    case 'restored':
        push(io, { t, kind: 'restore', ms: ev.ms, bytes: null, tokens: ev.tokens });
        break;
    default:
    }
}

/** Takes in /health's `disk` (null without a save directory). */
export function addDisk(d) {
    if (d) {
        push(disk, { t: now(), bytes: d.bytes });
    }
}

function queueDraw() {
    if (!drawQueued) {
        drawQueued = true;
        requestAnimationFrame(() => {
            drawQueued = false;
            draw();
        });
    }
}

const axis = (th, extra = {}) => ({
    stroke: th.fg,
    grid: { stroke: th.grid, width: 1 },
    ticks: { stroke: th.grid, width: 1 },
    ...extra,
});

const pointsOnly = (color, label, scale) => ({
    label,
    scale,
    stroke: color,
    fill: color,
    width: 0,
    paths: () => null,
    points: { show: true, size: 7, stroke: color, fill: color },
});

/** Each chart: its series, axes and data, from the lists above. */
const SPECS = {
    ttft() {
        const names = [...new Set(turns.filter((r) => r.ttft != null).map((r) => r.character ?? '(no character)'))];
        const rows = turns.filter((r) => r.ttft != null);
        return {
            key: names.join('\u0000'),
            opts: (th) => ({
                scales: { x: { time: true }, ms: { auto: true, range: (u, min, max) => [0, Math.max(10, max * 1.1)] } },
                axes: [axis(th), axis(th, { scale: 'ms', values: (u, vals) => vals.map((v) => ms(v)), size: 60 })],
                series: [{}, ...names.map((n, i) => ({
                    label: n,
                    scale: 'ms',
                    stroke: th.series[i % th.series.length],
                    width: 1.5,
                    spanGaps: true,
                    points: { show: true, size: 6 },
                    value: (u, v) => (v == null ? '–' : ms(v)),
                }))],
            }),
            data: [rows.map((r) => r.t), ...names.map((n) => rows.map((r) => ((r.character ?? '(no character)') === n ? r.ttft : null)))],
        };
    },
    reuse() {
        const rows = turns.filter((r) => r.cached != null || r.evaluated != null);
        return {
            key: '',
            opts: (th) => ({
                scales: { x: { time: true }, tok: { auto: true, range: (u, min, max) => [0, Math.max(10, max * 1.1)] } },
                axes: [axis(th), axis(th, { scale: 'tok', size: 60 })],
                series: [{},
                    { label: 'reused from cache', scale: 'tok', stroke: th.series[1], fill: `${th.series[1]}33`, width: 1.5, points: { show: true, size: 5 }, value: (u, v) => count(v) },
                    { label: 'evaluated', scale: 'tok', stroke: th.series[3], width: 1.5, points: { show: true, size: 5 }, value: (u, v) => count(v) }],
            }),
            data: [rows.map((r) => r.t), rows.map((r) => r.cached), rows.map((r) => r.evaluated)],
        };
    },
    io() {
        const pick = (kind, f) => io.map((r) => (r.kind === kind ? f(r) : null));
        return {
            key: '',
            opts: (th) => ({
                scales: { x: { time: true }, ms: { auto: true, range: (u, min, max) => [0, Math.max(10, max * 1.1)] }, mb: { auto: true, range: (u, min, max) => [0, Math.max(1, max * 1.1)] }, tok: { auto: true, range: (u, min, max) => [0, Math.max(10, max * 1.1)] } },
                axes: [
                    axis(th),
                    axis(th, { scale: 'ms', values: (u, vals) => vals.map((v) => ms(v)), size: 60 }),
                    axis(th, { scale: 'mb', side: 1, grid: { show: false }, values: (u, vals) => vals.map((v) => `${+v.toFixed(1)} MB`), size: 60 }),
                    axis(th, { scale: 'tok', side: 1, grid: { show: false }, values: (u, vals) => vals.map((v) => `${count(v)} tok`), size: 70 }),
                ],
                series: [{},
                    { ...pointsOnly(th.series[0], 'save time', 'ms'), value: (u, v) => (v == null ? '–' : ms(v)) },
                    { ...pointsOnly(th.series[2], 'restore time', 'ms'), value: (u, v) => (v == null ? '–' : ms(v)) },
                    { label: 'save size', scale: 'mb', stroke: th.series[0], width: 1, dash: [4, 4], spanGaps: true, points: { show: false }, value: (u, v) => (v == null ? '–' : `${v.toFixed(2)} MB`) },
                    { label: 'tokens restored', scale: 'tok', stroke: th.series[2], width: 1, dash: [4, 4], spanGaps: true, points: { show: false }, value: (u, v) => (v == null ? '–' : count(v)) }],
            }),
            data: [io.map((r) => r.t), pick('save', (r) => r.ms), pick('restore', (r) => r.ms),
                pick('save', (r) => r.bytes / 1e6), pick('restore', (r) => r.tokens)],
        };
    },
    disk() {
        return {
            key: '',
            opts: (th) => ({
                scales: { x: { time: true }, mb: { auto: true, range: (u, min, max) => [0, Math.max(1, max * 1.2)] } },
                axes: [axis(th), axis(th, { scale: 'mb', values: (u, vals) => vals.map((v) => `${+v.toFixed(1)} MB`), size: 64 })],
                series: [{}, {
                    label: 'save directory', scale: 'mb', stroke: th.series[4], fill: `${th.series[4]}33`, width: 2,
                    paths: uPlot.paths.stepped({ align: 1 }), points: { show: true, size: 5 },
                    value: (u, v) => (v == null ? '–' : bytes(v * 1e6)),
                }],
            }),
            data: [disk.map((r) => r.t), disk.map((r) => r.bytes / 1e6)],
        };
    },
};

function draw() {
    const th = theme();
    for (const [id, spec] of Object.entries(SPECS)) {
        const box = byId(`chart-${id}`);
        const plot = box.querySelector('.plot');
        const { key, opts, data } = spec();
        const points = data[0].length;
        box.dataset.points = String(points);
        box.classList.toggle('no-data', points === 0);
        let chart = charts.get(id);
        // New series (a character's first turn) or a new theme: build again.
        if (chart && chart.key !== key) {
            chart.u.destroy();
            charts.delete(id);
            chart = null;
        }
        if (!chart) {
            const width = Math.max(200, plot.clientWidth || box.clientWidth || 300);
            const u = new uPlot({ width, height: HEIGHT, legend: { show: true }, ...opts(th) }, data, plot);
            charts.set(id, { u, key });
        } else {
            chart.u.setData(data);
        }
    }
    drawTotals();
}

/** Prompt tokens reused and evaluated per character, and overall. */
function drawTotals() {
    const by = new Map();
    const all = { name: 'All characters', turns: 0, cached: 0, evaluated: 0 };
    for (const r of turns) {
        const name = r.character ?? '(no character)';
        const row = by.get(name) ?? { name, turns: 0, cached: 0, evaluated: 0 };
        for (const acc of [row, all]) {
            acc.turns += 1;
            acc.cached += r.cached ?? 0;
            acc.evaluated += r.evaluated ?? 0;
        }
        by.set(name, row);
    }
    const line = (r, overall) => {
        const total = r.cached + r.evaluated;
        const share = total ? r.cached / total : 0;
        const bar = h('span', { class: 'bar-fill' });
        bar.style.width = `${(share * 100).toFixed(1)}%`;
        return h('tr', { class: overall ? 'overall' : null, dataset: { character: overall ? '' : r.name } },
            h('td', {}, r.name),
            h('td', { class: 'num' }, count(r.turns)),
            h('td', { class: 'num' }, count(r.cached)),
            h('td', { class: 'num' }, count(r.evaluated)),
            h('td', { class: 'share' }, h('span', { class: 'bar' }, bar), ` ${Math.round(share * 100)} %`));
    };
    const rows = [...by.values()].sort((a, b) => a.name.localeCompare(b.name)).map((r) => line(r, false));
    const box = byId('reuse-totals');
    if (!turns.length) {
        fill(box, h('p', { class: 'empty' }, 'No turn since this page opened.'));
        return;
    }
    fill(box, h('div', { class: 'table-wrap' }, h('table', { class: 'totals' },
        h('thead', {}, h('tr', {}, ['Character', 'Turns', 'Reused', 'Evaluated', 'Reused share'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, line(all, true), rows))));
    const saves = io.filter((r) => r.kind === 'save');
    const restores = io.filter((r) => r.kind === 'restore');
    const sum = (list, f) => list.reduce((a, r) => a + (f(r) ?? 0), 0);
    byId('io-totals').textContent =
        `${count(saves.length)} saves, ${bytes(sum(saves, (r) => r.bytes))} in ${ms(sum(saves, (r) => r.ms))} · ` +
        `${count(restores.length)} restores, ${count(sum(restores, (r) => r.tokens))} tokens in ${ms(sum(restores, (r) => r.ms))}`;
}

/** Builds every chart again (the color scheme changed). */
export function rebuild() {
    for (const { u } of charts.values()) {
        u.destroy();
    }
    charts.clear();
    draw();
}

/** Sizes the charts to their boxes, now and whenever those change. */
export function init() {
    const observer = new ResizeObserver((entries) => {
        for (const entry of entries) {
            const id = entry.target.closest('[id^="chart-"]')?.id.slice('chart-'.length);
            const chart = charts.get(id);
            const width = Math.floor(entry.contentRect.width);
            if (chart && width > 0 && Math.abs(chart.u.width - width) > 1) {
                chart.u.setSize({ width, height: HEIGHT });
            }
        }
    });
    for (const id of Object.keys(SPECS)) {
        observer.observe(byId(`chart-${id}`).querySelector('.plot'));
    }
    draw();
}
