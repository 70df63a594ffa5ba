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

/** Timings of `baseline` and `measured` run in pairs: `a[i]` and `b[i]` ran back to back. */
export interface Pairs {
  readonly a: Array<number>
  readonly b: Array<number>
}

/**
 * Runs `baseline` and `measured` in pairs `runs` times after `warmup`
 * rounds (the order alternating, so neither always runs first), adding the
 * timings to `into`.
 */
export const pairs = async (
  baseline: () => Promise<unknown>,
  measured: () => Promise<unknown>,
  options: { readonly runs: number; readonly warmup: number },
  into: Pairs = { a: [], b: [] }
): Promise<Pairs> => {
  for (let i = 0; i < options.warmup; i++) {
    await baseline()
    await measured()
  }
  const time = async (f: () => Promise<unknown>) => {
    const t0 = performance.now()
    await f()
    return performance.now() - t0
  }
  for (let i = 0; i < options.runs; i++) {
    if (i % 2 === 0) {
      into.a.push(await time(baseline))
      into.b.push(await time(measured))
    } else {
      const m = await time(measured)
      into.a.push(await time(baseline))
      into.b.push(m)
    }
  }
  return into
}

/**
 * The median time of each side in milliseconds and the median of the pairs'
 * ratios: a pair runs within a fraction of a second, so a machine that slows
 * down and speeds up (a shared VM) moves both of its halves alike.
 */
export const summarize = (p: Pairs): { readonly baseline_ms: number; readonly traced_ms: number; readonly ratio: number } => ({
  baseline_ms: round(median(p.a)),
  traced_ms: round(median(p.b)),
  ratio: round(median(p.a.map((x, i) => p.b[i] / x)), 3)
})

/** {@link pairs} then {@link summarize}. */
export const compare = async (
  baseline: () => Promise<unknown>,
  measured: () => Promise<unknown>,
  options: { readonly runs: number; readonly warmup: number }
): Promise<{ readonly baseline_ms: number; readonly traced_ms: number; readonly ratio: number }> => summarize(await pairs(baseline, measured, options))

export const round = (x: number, digits = 3): number => Number(x.toFixed(digits))
