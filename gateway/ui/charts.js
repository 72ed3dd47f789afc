// Charts on the vendored uPlot (vendor/README.md): bars per UTC day, and a live line chart that
// grows by one sample per refresh. Each chart comes with its numbers as text elsewhere on the
// page (a canvas says nothing to a screen reader).

import uPlot from "./vendor/uPlot.esm.js";

export const COLORS = {
  prompt: "#3b6ea5",
  completion: "#d0893a",
  requests: "#4c8c5a",
  tokens: "#7a5ea8",
};

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
 * Bars per UTC day. history: [{date: "YYYY-MM-DD", <field>: n, ...}] oldest first;
 * series: [{field, label, color}], drawn side by side. Returns {destroy()}.
 */
export function dayBars(el, history, series) {
  const xs = history.map((d, i) => i); // one slot per day; the dates label them
  const dates = history.map((d) => d.date.slice(5)); // MM-DD
  const data = [xs, ...series.map((s) => history.map((d) => d[s.field] || 0))];
  const share = 0.8 / series.length;
  const step = Math.max(1, Math.ceil(history.length / 10)); // at most ~10 labels
  const chart = new uPlot(
    {
      width: width(el),
      height: HEIGHT,
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: false, range: () => [-0.5, history.length - 0.5] },
        y: { range: (u, min, max) => [0, Math.max(1, (max || 0) * 1.1)] },
      },
      axes: [
        {
          splits: () => xs.filter((i) => (history.length - 1 - i) % step === 0),
          values: (u, ticks) => ticks.map((i) => dates[i] ?? ""),
        },
        { incrs: COUNT_STEPS, values: (u, ticks) => ticks.map((t) => compact.format(t)), size: 56 },
      ],
      series: [
        { label: "day (UTC)", value: (u, i) => (i === null ? "–" : (history[i]?.date ?? "")) },
        ...series.map((s, i) => ({
          label: s.label,
          stroke: s.color,
          fill: s.color,
          width: 0,
          points: { show: false },
          // side by side around the day: the first bar left of it, the last right of it
          paths: uPlot.paths.bars({ size: [share, 48], align: series.length === 1 ? 0 : i === 0 ? -1 : 1 }),
        })),
      ],
    },
    data,
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
