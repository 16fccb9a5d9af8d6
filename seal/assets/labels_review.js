(() => {
  const page = document.body.dataset;
  const tbody = document.querySelector('#labels tbody');
  const rows = Array.from(tbody.rows);
  const store = 'seal-label-review:' + page.pageId;
  const count = document.getElementById('n-accepted');

  const key = tr => tr.dataset.passageId + '\u001f' + tr.dataset.question;
  const thresholdChoice = tr => (tr.dataset.kept === 'true' ? 'accept' : 'reject');
  const input = tr => tr.querySelector('input.answer');
  const corrected = tr => input(tr).value.trim() !== '' && input(tr).value.trim() !== tr.dataset.answer;
  // What a row exports: a typed answer different from the labeller's is a correction (kept).
  const decisionOf = tr => (corrected(tr) ? 'correct' : tr.dataset.decision);

  function show(tr) {
    const d = decisionOf(tr);
    tr.classList.toggle('accepted', d !== 'reject');
    tr.classList.toggle('rejected', d === 'reject');
    tr.querySelector('.corrected').hidden = d !== 'correct';
    for (const b of tr.querySelectorAll('button[data-decision]')) {
      b.setAttribute('aria-pressed', String(b.dataset.decision === tr.dataset.decision && d !== 'correct'));
    }
    count.textContent = rows.filter(r => decisionOf(r) !== 'reject').length;
  }
  function setDecision(tr, decision) {
    tr.dataset.decision = decision;
    if (decision !== 'correct') input(tr).value = tr.dataset.answer;
    show(tr);
  }
  function save() {
    const state = {};
    for (const tr of rows) state[key(tr)] = {decision: tr.dataset.decision, answer: input(tr).value};
    try { localStorage.setItem(store, JSON.stringify(state)); } catch (e) { /* no storage: fine */ }
  }

  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(store) || 'null'); } catch (e) { saved = null; }
  for (const tr of rows) {
    const s = saved ? saved[key(tr)] : undefined;
    setDecision(tr, s && (s.decision === 'accept' || s.decision === 'reject') ? s.decision : thresholdChoice(tr));
    if (s && typeof s.answer === 'string') { input(tr).value = s.answer; show(tr); }
  }

  tbody.addEventListener('click', (event) => {
    const button = event.target.closest('button[data-decision]');
    if (button) { setDecision(button.closest('tr'), button.dataset.decision); save(); }
  });
  tbody.addEventListener('input', (event) => {
    if (event.target.matches('input.answer')) { show(event.target.closest('tr')); save(); }
  });
  document.getElementById('reset').addEventListener('click', () => {
    for (const tr of rows) setDecision(tr, thresholdChoice(tr));
    save();
  });

  const headers = Array.from(document.querySelectorAll('#labels th[data-sort]'));
  for (const th of headers) {
    th.querySelector('button').addEventListener('click', () => {
      const k = th.dataset.sort;
      const dir = k === 'order' ? 'ascending' : (th.getAttribute('aria-sort') === 'descending' ? 'ascending' : 'descending');
      for (const other of headers) other.removeAttribute('aria-sort');
      th.setAttribute('aria-sort', dir);
      const sign = dir === 'ascending' ? 1 : -1;
      const value = (tr, f) => Number(tr.dataset[f]);
      const sorted = rows.slice().sort((a, b) => sign * (value(a, k) - value(b, k)) || value(a, 'order') - value(b, 'order'));
      for (const tr of sorted) tbody.appendChild(tr);
    });
  }

  document.getElementById('export').addEventListener('click', () => {
    const payload = {
      format: page.format, labels: page.name, page_id: page.pageId, exported_at: new Date().toISOString(),
      decisions: rows.map(tr => {
        const d = decisionOf(tr);
        const out = {passage_id: tr.dataset.passageId, question: tr.dataset.question, decision: d};
        if (d === 'correct') out.answer = input(tr).value.trim();
        return out;
      }),
    };
    downloadJSON(payload, page.filename, document.getElementById('exported'));
  });
})();
