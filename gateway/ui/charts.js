// Charts on the vendored uPlot (vendor/README.md): bars per category (per UTC day, per version,
// per bin), and a live line chart that grows by one sample per refresh. Each chart comes with its numbers as text elsewhere on the
// page (a canvas says nothing to a screen reader).

import uPlot from "./vendor/uPlot.esm.js";

export const COLORS = {
  prompt: "#3b6ea5",
  completion: "#d0893a",
  requests: "#4c8c5a",
  tokens: "#7a5ea8",
  baseline: "#8a94a6",
  current: "#2f5fa7",
};
// For series with no fixed meaning (finish reasons, percentiles): distinct, colour-blind safe (Okabe-Ito).
export const PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000"];

const HEIGHT = 220;

function width(el) {
  return Math.max(280, Math.floor(el.getBoundingClientRect().width) || 520);
}

const utcClock = (seconds) => new Date(seconds * 1000).toISOString().slice(11, 19); // HH:MM:SS
// Whole-number steps for the value axes: the figures are counts.
const COUNT_STEPS = [1, 2, 5]
  .flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9].map((p) => m * p))
  .sort((a, b) => a - b);
const compact = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });

/** Follows the container's width; returns the function that stops following. */
function followWidth(chart, el) {
  const observer = new ResizeObserver(() => chart.setSize({ width: width(el), height: HEIGHT }));
  observer.observe(el);
  return () => observer.disconnect();
}

/**
 * Bars per category, the series side by side in each. labels: one per category (x axis);
 * series: [{label, color, values}] (values: one number or null per category); options: format
 * (the value axis' labels), max (the value axis' top, e.g. 1 for shares), every (label every n-th
 * category), legendLabel/legendValue (the category's name in the legend). Returns {destroy()}.
 */
export function categoryBars(el, labels, series, options = {}) {
  const { format = (t) => compact.format(t), max = null, every = 1 } = options;
  const xs = labels.map((label, i) => i); // one slot per category; the labels name them
  const share = 0.8 / Math.max(1, series.length); // of each slot's width, per series
  const left = (s) => xs.map((i) => i - 0.4 + s * share); // where series s's bars start
  const last = labels.length - 1;
  const chart = new uPlot(
    {
      width: width(el),
      height: HEIGHT,
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: false, range: () => [-0.5, labels.length - 0.5] },
        y: { range: (u, lo, hi) => [0, max ?? (Math.max(0, hi || 0) * 1.1 || 1)] },
      },
      axes: [
        {
          splits: () => xs.filter((i) => (last - i) % every === 0),
          values: (u, ticks) => ticks.map((i) => labels[i] ?? ""),
        },
        { ...(options.integers ? { incrs: COUNT_STEPS } : {}), values: (u, ticks) => ticks.map(format), size: 60 },
      ],
      series: [
        { label: options.legendLabel || "", value: (u, i) => (i === null ? "–" : (labels[i] ?? "")) },
        ...series.map((s, n) => ({
          label: s.label,
          stroke: s.color,
          fill: s.color,
          width: 0,
          points: { show: false },
          paths: uPlot.paths.bars({
            disp: { x0: { unit: 1, values: () => left(n) }, size: { unit: 1, values: () => [share] } },
          }),
        })),
      ],
    },
    [xs, ...series.map((s) => s.values.map((v) => v ?? null))],
    el,
  );
  const unfollow = followWidth(chart, el);
  return {
    destroy() {
      unfollow();
      chart.destroy();
    },
  };
}

/**
 * Bars per UTC day. history: [{date: "YYYY-MM-DD", <field>: n, ...}] oldest first;
 * series: [{field, label, color}], drawn side by side. Returns {destroy()}.
 */
export function dayBars(el, history, series) {
  return categoryBars(
    el,
    history.map((d) => d.date.slice(5)), // MM-DD
    series.map((s) => ({ label: s.label, color: s.color, values: history.map((d) => d[s.field] || 0) })),
    { integers: true, every: Math.max(1, Math.ceil(history.length / 10)), legendLabel: "day (UTC)" },
  );
}

/**
 * A live chart of the current minute's figures over the last `seconds`: one sample per call of
 * push(). series: [{label, color, scale}] (scale "left" or "right"). Returns {push, destroy}.
 */
export function liveLines(el, series, seconds = 180) {
  const data = [[], ...series.map(() => [])];
  // a window that ends at the newest sample, so the chart scrolls and never collapses to a point
  const windowEnd = () => (data[0].length ? data[0][data[0].length - 1] : Date.now() / 1000);
  const chart = new uPlot(
    {
      width: width(el),
      height: HEIGHT,
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: true, range: () => [windowEnd() - seconds, windowEnd()] }, // unix seconds
        left: { range: (u, min, max) => [0, Math.max(1, (max || 0) * 1.1)] },
        right: { range: (u, min, max) => [0, Math.max(1, (max || 0) * 1.1)] },
      },
      axes: [
        { values: (u, ticks) => ticks.map(utcClock), space: 80 },
        { scale: "left", incrs: COUNT_STEPS, values: (u, ticks) => ticks.map((t) => compact.format(t)), size: 50 },
        {
          scale: "right",
          side: 1,
          grid: { show: false },
          incrs: COUNT_STEPS,
          values: (u, ticks) => ticks.map((t) => compact.format(t)),
          size: 56,
        },
      ],
      series: [
        { label: "time (UTC)", value: (u, v) => (v === null ? "–" : utcClock(v)) },
        ...series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: 2,
          scale: s.scale,
          points: { show: true, size: 5 },
        })),
      ],
    },
    data,
    el,
  );
  const unfollow = followWidth(chart, el);
  return {
    push(at, values) {
      data[0].push(at);
      values.forEach((v, i) => data[i + 1].push(v));
      while (data[0][0] < windowEnd() - seconds) for (const column of data) column.shift();
      chart.setData(data);
    },
    destroy() {
      unfollow();
      chart.destroy();
    },
  };
}
