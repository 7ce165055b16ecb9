// Keyboard-first voting: each key selects one answer; Enter submits when every criterion has one.
// Votes are sent as left/tie/right; the server turns them into method A/B with the stored layout.
(function () {
  "use strict";
  const form = document.getElementById("vote-form");
  if (!form) return;
  const submit = document.getElementById("submit");
  const status = document.getElementById("status");
  const pairId = form.dataset.pairId;
  const shownAt = performance.now();
  const byKey = new Map();
  form.querySelectorAll("input[type=radio][data-key]").forEach((input) => byKey.set(input.dataset.key, input));
  const criteria = Array.from(form.querySelectorAll("fieldset.criterion")).map((f) => f.dataset.criterion);
  let sending = false;

  function answers() {
    const out = {};
    for (const name of criteria) {
      const checked = form.querySelector(`input[name="${name}"]:checked`);
      if (!checked) return null;
      out[name] = checked.value;
    }
    return out;
  }

  function refresh() {
    submit.disabled = sending || answers() === null;
  }

  async function send() {
    const chosen = answers();
    if (chosen === null || sending) return;
    sending = true;
    refresh();
    status.textContent = "Saving…";
    const body = Object.assign({ pair_id: pairId, elapsed_ms: Math.round(performance.now() - shownAt) }, chosen);
    try {
      const response = await fetch("/api/votes", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        credentials: "same-origin",
        body: JSON.stringify(body),
      });
      // 409: this pair already has our vote (e.g. sent from another tab); either way move on.
      if (response.status === 201 || response.status === 409) {
        window.location.replace("/annotate");
        return;
      }
      const detail = await response.json().catch(() => ({}));
      status.textContent = `Not saved (${response.status}): ${JSON.stringify(detail.detail || "")}`;
    } catch (error) {
      status.textContent = "Not saved: the server cannot be reached. Press Enter to retry.";
    }
    sending = false;
    refresh();
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "Enter") {
      event.preventDefault();
      send();
      return;
    }
    const input = byKey.get(event.key.toLowerCase());
    if (input) {
      event.preventDefault();
      input.checked = true;
      refresh();
    }
  });
  form.addEventListener("change", refresh);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  refresh();
})();
