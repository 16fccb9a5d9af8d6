(() => {
  const page = document.body.dataset;
  const tbody = document.querySelector('#edits tbody');
  const rows = Array.from(tbody.rows);
  const store = 'seal-review:' + page.pageId;
  const count = document.getElementById('n-accepted');

  const key = tr => tr.dataset.passageId + '\u001f' + tr.dataset.index;
  const filterChoice = tr => (tr.dataset.kept === 'true' ? 'accept' : 'reject');

  function setDecision(tr, decision) {
    tr.dataset.decision = decision;
    tr.classList.toggle('accepted', decision === 'accept');
    tr.classList.toggle('rejected', decision === 'reject');
    for (const b of tr.querySelectorAll('button[data-decision]')) {
      b.setAttribute('aria-pressed', String(b.dataset.decision === decision));
    }
    count.textContent = rows.filter(r => r.dataset.decision === 'accept').length;
  }
  function save() {
    const state = {};
    for (const tr of rows) state[key(tr)] = tr.dataset.decision;
    try { localStorage.setItem(store, JSON.stringify(state)); } catch (e) { /* no storage: fine */ }
  }
  function reset() {
    for (const tr of rows) setDecision(tr, filterChoice(tr));
    save();
  }

  // Start from the decisions saved in this browser for this very page, else from the filter's choice.
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(store) || 'null'); } catch (e) { saved = null; }
  for (const tr of rows) {
    const d = saved ? saved[key(tr)] : undefined;
    const valid = d === 'reject' || (d === 'accept' && tr.dataset.acceptable === 'true');
    setDecision(tr, valid ? d : filterChoice(tr));
  }

  tbody.addEventListener('click', (event) => {
    const button = event.target.closest('button[data-decision]');
    if (button && !button.disabled) {
      setDecision(button.closest('tr'), button.dataset.decision);
      save();
    }
  });
  document.getElementById('reset').addEventListener('click', reset);

  const headers = Array.from(document.querySelectorAll('#edits th[data-sort]'));
  for (const th of headers) {
    th.querySelector('button').addEventListener('click', () => {
      const key = th.dataset.sort;
      const current = th.getAttribute('aria-sort');
      const dir = key === 'order' ? 'ascending' : (current === 'descending' ? 'ascending' : 'descending');
      for (const other of headers) other.removeAttribute('aria-sort');
      th.setAttribute('aria-sort', dir);
      const sign = dir === 'ascending' ? 1 : -1;
      const value = (tr, k) => Number(tr.dataset[k]);
      const sorted = rows.slice().sort((a, b) =>
        sign * (value(a, key) - value(b, key)) || value(a, 'order') - value(b, 'order'));
      for (const tr of sorted) tbody.appendChild(tr);
    });
  }

  document.getElementById('export').addEventListener('click', () => {
    const payload = {
      format: page.format, run: page.run, round: Number(page.round), page_id: page.pageId,
      exported_at: new Date().toISOString(),
      decisions: rows.map(tr => ({
        passage_id: tr.dataset.passageId, index: Number(tr.dataset.index), decision: tr.dataset.decision,
      })),
    };
    downloadJSON(payload, page.filename, document.getElementById('exported'));
  });
})();
