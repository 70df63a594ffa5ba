/**
 * Topological orders of a graph's nodes in which every module is contiguous,
 * so a module call is a node range `[start, end)` and can be cut out as a
 * segment.
 *
 * @example
 * import * as Linearize from "./Linearize.js"
 * const order = Linearize.contiguous(graph.nodes, { own: [0, 3], children: [{ own: [1, 2], children: [] }] })
 *
 * @since 0.1.0
 */

/**
 * A module as the linearisation sees it: the indices of its own nodes and its
 * child modules.
 *
 * @since 0.1.0
 */
export interface Group {
  readonly own: ReadonlyArray<number>
  readonly children: ReadonlyArray<Group>
}

/**
 * The node shape the linearisation reads.
 *
 * @since 0.1.0
 */
export interface NodeLike {
  readonly inputs: ReadonlyArray<string>
  readonly outputs: ReadonlyArray<string>
}

/**
 * Orders nodes so that each group (module) is contiguous and every node comes
 * after the nodes producing its inputs. Within a group, its own nodes and child
 * groups are ordered topologically, ties broken by the exporter's order (the
 * order PyTorch ran them). Where a module is not convex (something outside it
 * both depends on it and feeds it), that group keeps the exporter's order.
 *
 * @example
 * Linearize.contiguous(nodes, root) // [0, 1, 2, ...] indices into nodes
 *
 * @since 0.1.0
 */
export const contiguous = (nodes: ReadonlyArray<NodeLike>, root: Group): ReadonlyArray<number> => {
  const producer = new Map<string, number>()
  nodes.forEach((n, i) => n.outputs.forEach((o) => o !== "" && producer.set(o, i)))
  const out: Array<number> = []
  const visit = (group: Group) => {
    const subtrees = group.children.map(nodesOf)
    // item k < own.length is a node; item own.length + c is child c
    const own = group.own
    const itemOf = new Map<number, number>()
    own.forEach((n, k) => itemOf.set(n, k))
    subtrees.forEach((s, c) => s.forEach((n) => itemOf.set(n, own.length + c)))
    const count = own.length + subtrees.length
    const firstIndex = Array.from({ length: count }, (_, k) =>
      k < own.length ? own[k] : Math.min(...subtrees[k - own.length])
    )
    const successors = Array.from({ length: count }, () => new Set<number>())
    const indegree = new Array<number>(count).fill(0)
    for (const [n, item] of itemOf) {
      for (const t of nodes[n].inputs) {
        const p = producer.get(t)
        if (p === undefined) continue
        const from = itemOf.get(p)
        if (from === undefined || from === item || successors[from].has(item)) continue
        successors[from].add(item)
        indegree[item]++
      }
    }
    const ready = new MinHeap((a: number, b: number) => firstIndex[a] - firstIndex[b])
    for (let k = 0; k < count; k++) if (indegree[k] === 0) ready.push(k)
    const ordered: Array<number> = []
    while (ready.size > 0) {
      const k = ready.pop()
      ordered.push(k)
      for (const s of successors[k]) if (--indegree[s] === 0) ready.push(s)
    }
    if (ordered.length < count) {
      out.push(...[...itemOf.keys()].sort((a, b) => a - b))
      return
    }
    for (const k of ordered) {
      if (k < own.length) out.push(own[k])
      else visit(group.children[k - own.length])
    }
  }
  visit(root)
  return out
}

const nodesOf = (group: Group): ReadonlyArray<number> => {
  const out: Array<number> = [...group.own]
  group.children.forEach((c) => out.push(...nodesOf(c)))
  return out
}

class MinHeap<A> {
  private readonly items: Array<A> = []
  constructor(private readonly compare: (a: A, b: A) => number) {}
  get size(): number {
    return this.items.length
  }
  push(a: A): void {
    const items = this.items
    items.push(a)
    let i = items.length - 1
    while (i > 0) {
      const parent = (i - 1) >> 1
      if (this.compare(items[i], items[parent]) >= 0) break
      ;[items[i], items[parent]] = [items[parent], items[i]]
      i = parent
    }
  }
  pop(): A {
    const items = this.items
    const top = items[0]
    const last = items.pop()!
    if (items.length > 0) {
      items[0] = last
      let i = 0
      for (;;) {
        const l = 2 * i + 1
        const r = l + 1
        let m = i
        if (l < items.length && this.compare(items[l], items[m]) < 0) m = l
        if (r < items.length && this.compare(items[r], items[m]) < 0) m = r
        if (m === i) break
        ;[items[i], items[m]] = [items[m], items[i]]
        i = m
      }
    }
    return top
  }
}
