/**
 * The requests of the remote load test and the co-batching benchmark:
 * three kinds of intervention graph over eight stories260K prompts of the
 * same length, each with the outcome a local run gives.
 */
import { Cause, Effect, Exit } from "effect"
import { Backend, type Envoy, type LanguageModel, type Tensor } from "../../src/index.js"
import type * as Local from "../../src/backends/Local.js"
import type * as Graph from "../../src/core/Graph.js"

/** One request and what a local run of it gives. */
export interface Case {
  readonly graph: Graph.Graph
  readonly feeds: Record<string, Tensor>
  readonly rows: ReadonlyArray<Local.Rows>
  readonly expected: Local.Outcome
}

const graphs: ReadonlyArray<(m: Envoy) => unknown> = [
  (m) => ({ logits: m.lm_head.output.at(":", -1) }),
  (m) => {
    m.model.layers[2].output.update((h) => h.mul(0.5))
    return { logits: m.lm_head.output.at(":", -1), h: m.model.layers[4].output.mean(-1) }
  },
  (m) => {
    m.model.layers[0].mlp.output.set(0)
    return { attn: m.model.layers[1].self_attn.output.softmax(-1).at(":", -1) }
  }
]

/**
 * The 24 requests, recorded and run locally on `lm`.
 *
 * @example
 * const cases = await loadCases(lm)
 */
export const loadCases = async (lm: LanguageModel): Promise<Array<Case>> => {
  const cases: Array<Case> = []
  for (let p = 0; p < 8; p++) {
    const ids = Array.from({ length: 12 }, (_, k) => 1 + ((p * 53 + k * 29) % 500))
    for (const fn of graphs) {
      const { graph } = lm.record(ids, fn)
      const { feeds, rows } = lm.batch([ids])
      const exit = await Effect.runPromiseExit(Backend.local.execute({ runtime: lm.runtime, graph, feeds, rows }))
      if (Exit.isFailure(exit)) throw new Error(Cause.pretty(exit.cause))
      cases.push({ graph, feeds: { ...feeds }, rows, expected: exit.value })
    }
  }
  return cases
}
