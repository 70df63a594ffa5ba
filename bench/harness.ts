/**
 * Timing helpers for the benchmarks: A/B interleaved runs so that machine
 * noise hits the baseline and the measured code alike, and medians.
 */

/** Median of a list of numbers. */
export const median = (xs: ReadonlyArray<number>): number => {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 === 1 ? s[m] : (s[m - 1] + s[m]) / 2
}

/**
 * Runs `baseline` and `measured` alternately `runs` times after `warmup`
 * rounds, and returns the median time of each in milliseconds.
 */
export const compare = async (
  baseline: () => Promise<unknown>,
  measured: () => Promise<unknown>,
  options: { readonly runs: number; readonly warmup: number }
): Promise<{ readonly baseline_ms: number; readonly traced_ms: number; readonly ratio: number }> => {
  for (let i = 0; i < options.warmup; i++) {
    await baseline()
    await measured()
  }
  const a: Array<number> = []
  const b: Array<number> = []
  for (let i = 0; i < options.runs; i++) {
    let t0 = performance.now()
    await baseline()
    a.push(performance.now() - t0)
    t0 = performance.now()
    await measured()
    b.push(performance.now() - t0)
  }
  const baseline_ms = median(a)
  const traced_ms = median(b)
  return { baseline_ms: round(baseline_ms), traced_ms: round(traced_ms), ratio: round(traced_ms / baseline_ms, 3) }
}

export const round = (x: number, digits = 3): number => Number(x.toFixed(digits))
