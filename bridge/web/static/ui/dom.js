// Small DOM helpers: text is always set as text (model output never becomes markup).

/** The element with this id (throws if the page lacks it: a broken page says so). */
export function byId(id) {
  const found = document.getElementById(id);
  if (!found) throw new Error(`#${id} missing from the page`);
  return found;
}

/**
 * A new element: `el("td", {className: "x", dataset: {seq: 1}}, "text", child)`.
 * Children are nodes or text (made into text nodes).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** A number for people: `1234.5` -> "1234.5", at most `digits` decimals. */
export function num(value, digits = 1) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return Number(value.toFixed(digits)).toString();
}

/** Milliseconds as "850 ms" or "2.4 s". */
export function ms(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return value < 1000 ? `${Math.round(value)} ms` : `${num(value / 1000)} s`;
}
