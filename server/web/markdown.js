// The chat page's Markdown. Every piece of text is HTML-escaped *before* any formatting is applied, and the formatting
// only ever adds fixed tags (plus an http(s) href or a [\w+#.-] class), so model output can never become
// markup of its own. Supported: fenced code blocks, headings, lists, block quotes, rules, paragraphs,
// `inline code`, **bold**, *italic*, ~~strike~~ and [links](https://...).

export function escapeHtml(text) {
  return text
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&#39;");
}

// Inline formatting of one block's raw text. Code spans and links are set aside in numbered slots (NUL
// delimited; NULs are removed from the input first) so that emphasis never reaches inside them.
function renderInline(raw) {
  const slots = [];
  const keep = (html) => "\u0000" + (slots.push(html) - 1) + "\u0000";
  let s = escapeHtml(raw);
  s = s.replace(/`([^`]+)`/g, (_, code) => keep("<code>" + code + "</code>"));
  s = s.replace(
    /\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g,
    (_, label, url) => keep('<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + label + "</a>"),
  );
  s = s.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/__(?=\S)([\s\S]*?\S)__/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>");
  s = s.replace(/(^|[^\w])_(?=\S)([^_]*?\S)_(?!\w)/g, "$1<em>$2</em>");
  s = s.replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
  // A link label may hold a code slot: restore until none is left (slots never contain their own number).
  for (let pass = 0; pass < 3 && s.includes("\u0000"); pass++) {
    s = s.replace(/\u0000(\d+)\u0000/g, (_, n) => slots[Number(n)]);
  }
  return s;
}

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^\s*(#{1,6})\s+(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || BULLET.test(line) ||
    NUMBERED.test(line) || QUOTE.test(line);
}

// Markdown source -> HTML string. An unclosed code fence (an answer still streaming) runs to the end.
export function renderMarkdown(source) {
  const lines = String(source).replace(/\u0000/g, "").split(/\r?\n/);
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (line.trim() === "") {
      i++;
    } else if ((m = line.match(FENCE))) {
      const body = [];
      for (i++; i < lines.length && lines[i].trim() !== m[1]; i++) body.push(lines[i]);
      i++;
      const lang = m[2] ? ' class="language-' + escapeHtml(m[2]) + '"' : "";
      out.push("<pre><code" + lang + ">" + escapeHtml(body.join("\n")) + "</code></pre>");
    } else if ((m = line.match(HEADING))) {
      const level = Math.min(m[1].length + 2, 6); // an answer's "# Title" should not outshout the page
      out.push("<h" + level + ">" + renderInline(m[2]) + "</h" + level + ">");
      i++;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i++;
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const pattern = BULLET.test(line) ? BULLET : NUMBERED;
      const items = [];
      for (; i < lines.length && (m = lines[i].match(pattern)); i++) {
        items.push("<li>" + renderInline(m[pattern === BULLET ? 1 : 2]) + "</li>");
      }
      if (pattern === BULLET) {
        out.push("<ul>" + items.join("") + "</ul>");
      } else {
        const start = parseInt(line.match(NUMBERED)[1], 10);
        out.push((start === 1 ? "<ol>" : '<ol start="' + start + '">') + items.join("") + "</ol>");
      }
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && (m = lines[i].match(QUOTE)); i++) quoted.push(m[1]);
      out.push("<blockquote>" + renderMarkdown(quoted.join("\n")) + "</blockquote>");
    } else {
      const paragraph = [];
      for (; i < lines.length && lines[i].trim() !== "" && (paragraph.length === 0 || !startsBlock(lines[i])); i++) {
        paragraph.push(lines[i]);
      }
      out.push("<p>" + paragraph.map(renderInline).join("<br>") + "</p>");
    }
  }
  return out.join("");
}
