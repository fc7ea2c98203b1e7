/* slmfleet console: live regions fed by server-sent events.
 * An element with data-live="URL" is replaced, fragment by fragment, with the
 * HTML the server renders (and escapes) for it; "done" ends the stream. */
(function () {
  "use strict";
  function follow(el) {
    var source = new EventSource(el.getAttribute("data-live"));
    function swap(event) { el.innerHTML = event.data; el.setAttribute("data-updated", Date.now()); }
    source.addEventListener("progress", swap);
    source.addEventListener("done", function (event) { swap(event); source.close(); el.setAttribute("data-done", "true"); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(follow);
  });
})();
