/* slmfleet console: live regions fed by server-sent events.
 * An element with data-live="URL" is replaced, fragment by fragment, with the
 * HTML the server renders (and escapes) for it; "done" ends the stream.
 * Keyboard focus inside the region is put back on the same link or field. */
(function () {
  "use strict";
  function focusKey(el) {
    var active = document.activeElement;
    if (!active || !el.contains(active)) { return null; }
    if (active.id) { return "#" + CSS.escape(active.id); }
    var href = active.getAttribute("href");
    return href ? "[href=\"" + CSS.escape(href) + "\"]" : null;
  }
  function follow(el) {
    var source = new EventSource(el.getAttribute("data-live"));
    function swap(event) {
      var key = focusKey(el);
      el.innerHTML = event.data;
      el.setAttribute("data-updated", String(Date.now()));
      var again = key && el.querySelector(key);
      if (again) { again.focus(); }
    }
    source.addEventListener("progress", swap);
    source.addEventListener("done", function (event) {
      swap(event);
      source.close();
      el.setAttribute("data-done", "true");
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(follow);
  });
})();
