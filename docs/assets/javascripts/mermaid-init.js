// Renders every ```mermaid block with the vendored mermaid.min.js (no CDN). The blocks are
// <div class="mermaid"> (mkdocs.yml: fence_div_format), which mkdocs-material's own Mermaid
// support (pre.mermaid, loaded from a CDN, drawn into a closed shadow root) leaves alone: the
// SVG lands in the page itself, where tests/test_docs.py finds it.
mermaid.initialize({ startOnLoad: false, securityLevel: "strict", theme: "neutral" });

function renderDiagrams() {
  mermaid.run({ querySelector: "div.mermaid:not([data-processed])" });
}

if (window.document$) {
  document$.subscribe(renderDiagrams); // every page, also after instant navigation
} else {
  window.addEventListener("DOMContentLoaded", renderDiagrams);
}
