package worker

import (
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

func acmeKey() map[string]string { return map[string]string{"api_key": secretAPIKey} }

func TestValidateVerdicts(t *testing.T) {
	cases := map[string]struct {
		id        string
		creds     map[string]string
		handler   http.HandlerFunc
		wantState state.State
		// wantReason is the verdict reason; "" means no verdict.
		wantReason  string
		wantOutcome string
		transient   bool
	}{
		"ValidToCallable": {
			id: "crm+acme", creds: acmeKey(), handler: requireHeader("X-Api-Token", "Token "+secretAPIKey),
			wantState: state.Callable, wantReason: state.ReasonCheckPassed, wantOutcome: outcomeValid,
		},
		"401ToInvalid": {
			id: "crm+acme", creds: acmeKey(), handler: status(401),
			wantState: state.Invalid, wantReason: state.ReasonCredentialsRejected, wantOutcome: outcomeInvalid,
		},
		"403InvalidPerCatalog": {
			id: "crm+acme", creds: acmeKey(), handler: status(403),
			wantState: state.Invalid, wantReason: state.ReasonCredentialsRejected, wantOutcome: outcomeInvalid,
		},
		"403TransientWhereCatalogListsOnly401": {
			id: "crm+only401", creds: acmeKey(), handler: status(403),
			wantState: state.Added, wantOutcome: outcomeTransient, transient: true,
		},
		"404MisconfiguredPerCatalog": {
			id: "crm+acme", creds: acmeKey(), handler: status(404),
			wantState: state.Invalid, wantReason: state.ReasonMisconfiguredAccount, wantOutcome: outcomeInvalid,
		},
		"500Transient": {
			id: "crm+acme", creds: acmeKey(), handler: status(500),
			wantState: state.Added, wantOutcome: outcomeTransient, transient: true,
		},
		"AssertionFailed": {
			id: "ticketing+zen", creds: map[string]string{"username": "agent", "password": secretPassword},
			handler:   jsonBody(200, `{"user":{"id":null,"name":"Anonymous"}}`),
			wantState: state.Invalid, wantReason: state.ReasonAssertionFailed, wantOutcome: outcomeInvalid,
		},
		"AssertionHolds": {
			id: "ticketing+zen", creds: map[string]string{"username": "agent", "password": secretPassword},
			handler:   jsonBody(200, `{"user":{"id":7}}`),
			wantState: state.Callable, wantReason: state.ReasonCheckPassed, wantOutcome: outcomeValid,
		},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			b := setup(t)
			_, svc, _ := state.SplitConnectionID(tc.id)
			b.p.handle("/"+svc+"/me", tc.handler)
			b.p.handle("/zen/users/me.json", tc.handler)
			before := b.put(tc.id, tc.creds, nil)
			require.Equal(t, state.Added, before.State)
			w := b.worker()
			err := process(t, w, validateTask(t, tc.id))
			if tc.transient {
				require.Error(t, err)
				require.NotErrorIs(t, err, asynq.SkipRetry)
			} else {
				require.NoError(t, err)
			}
			c := b.get(tc.id)
			require.Equal(t, tc.wantState, c.State)
			if tc.wantReason == "" {
				require.Nil(t, c.Verdict)
				require.Equal(t, 1, c.Transient.Failures)
			} else {
				require.NotNil(t, c.Verdict)
				require.Equal(t, tc.wantReason, c.Verdict.Reason)
				require.Equal(t, before.Revision, c.Verdict.Revision)
			}
			require.Equal(t, 1, b.p.total())
			require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.checks.WithLabelValues(svc, tc.wantOutcome)))
			requireNoSecrets(t, b.logs.String())
		})
	}
}

func TestValidateTransientKeepsState(t *testing.T) {
	b := setup(t)
	b.p.handle("/acme/me", status(200))
	b.put("crm+acme", acmeKey(), nil)
	w := b.worker()
	require.NoError(t, process(t, w, validateTask(t, "crm+acme")))
	require.Equal(t, state.Callable, b.get("crm+acme").State)

	t.Run("5xxStorm", func(t *testing.T) {
		b.p.handle("/acme/me", status(502))
		for i := range 5 {
			err := process(t, w, validateTask(t, "crm+acme"))
			require.ErrorContains(t, err, "status 502")
			c := b.get("crm+acme")
			require.Equal(t, state.Callable, c.State)
			require.Equal(t, state.HealthDegraded, c.Health)
			require.Equal(t, i+1, c.Transient.Failures)
		}
	})
	t.Run("Timeout", func(t *testing.T) {
		b.p.handle("/acme/me", func(rw http.ResponseWriter, r *http.Request) {
			select {
			case <-time.After(3 * time.Second):
			case <-r.Context().Done():
			}
		})
		start := time.Now()
		err := process(t, w, validateTask(t, "crm+acme"))
		require.ErrorContains(t, err, "timeout")
		require.Less(t, time.Since(start), 2500*time.Millisecond, "the catalog's 1s check timeout applies")
		require.Equal(t, state.Callable, b.get("crm+acme").State)
	})
	t.Run("ConnectionRefused", func(t *testing.T) {
		// A provider that is down: the listener is gone.
		p2 := newProvider(t)
		p2.srv.Close()
		cat2 := testCatalog(t, p2.host)
		w2 := b.worker(func(c *Config) { c.Catalog = cat2 })
		err := process(t, w2, validateTask(t, "crm+acme"))
		require.ErrorContains(t, err, "connection")
		require.Equal(t, state.Callable, b.get("crm+acme").State)
	})
	t.Run("FirstSuccessClears", func(t *testing.T) {
		b.p.handle("/acme/me", status(200))
		require.NoError(t, process(t, w, validateTask(t, "crm+acme")))
		c := b.get("crm+acme")
		require.Equal(t, state.HealthOK, c.Health)
		require.Zero(t, c.Transient.Failures)
	})
}

func TestValidate429HonoursRetryAfter(t *testing.T) {
	b := setup(t)
	b.p.handle("/acme/me", func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Retry-After", "37")
		rw.WriteHeader(http.StatusTooManyRequests)
	})
	b.put("crm+acme", acmeKey(), nil)
	w := b.worker()
	err := process(t, w, validateTask(t, "crm+acme"))
	var ra *RetryAfterError
	require.ErrorAs(t, err, &ra)
	require.Equal(t, 37*time.Second, ra.After)
	require.Equal(t, 37*time.Second, w.RetryDelay(3, err, nil))
	require.True(t, isFailure(err), "a provider 429 uses up a retry")
	c := b.get("crm+acme")
	require.Equal(t, state.Added, c.State)
	require.Equal(t, 1, c.Transient.Failures)
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.checks.WithLabelValues("acme", outcomeRateLimited)))

	t.Run("HTTPDate", func(t *testing.T) {
		now := time.Now().UTC().Truncate(time.Second)
		b.p.handle("/acme/me", func(rw http.ResponseWriter, _ *http.Request) {
			rw.Header().Set("Retry-After", now.Add(2*time.Minute).Format(http.TimeFormat))
			rw.WriteHeader(http.StatusTooManyRequests)
		})
		w := b.worker(func(c *Config) { c.NowFunc = func() time.Time { return now } })
		err := process(t, w, validateTask(t, "crm+acme"))
		require.Equal(t, 2*time.Minute, w.RetryDelay(0, err, nil))
	})
}

func TestValidateNoOps(t *testing.T) {
	b := setup(t)
	for _, path := range []string{"/acme/me", "/devco/me", "/bamboo/x/meta"} {
		b.p.handle(path, status(200))
	}
	w := b.worker()
	enabled := false
	_, err := b.store.Put(context.Background(), state.Ref{ConsumerID: consumer, ConnectionID: "crm+acme"},
		state.Input{Enabled: &enabled, Credentials: acmeKey()}, 0)
	require.NoError(t, err)
	b.put("crm+devco", acmeKey(), nil)
	b.put("hris+bamboo", nil, nil) // added, without credentials

	for id, why := range map[string]string{
		"crm+acme":    skipDisabled,
		"crm+devco":   skipNotCheckable,
		"hris+bamboo": skipNothingToCheck,
		"crm+qkey":    skipNotFound,
	} {
		t.Run(id, func(t *testing.T) {
			require.NoError(t, process(t, w, validateTask(t, id)))
			require.Contains(t, b.logs.String(), `"connection_id":"`+id+`"`)
			require.Contains(t, b.logs.String(), `"skipped":"`+why+`"`)
		})
	}
	require.Zero(t, b.p.total(), "no provider call for disabled, not checkable, nothing to check, deleted")
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.checks.WithLabelValues("acme", outcomeSkipped)))
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.checks.WithLabelValues(unknownLabel, outcomeSkipped)))
}

func TestValidateMalformedPayload(t *testing.T) {
	b := setup(t)
	w := b.worker()
	for name, payload := range map[string]string{
		"NotJSON":    `{"v":1,`,
		"BadVersion": `{"v":9,"consumer_id":"c","connection_id":"crm+acme","reason":"on_demand"}`,
		"BadID":      `{"v":1,"consumer_id":"c","connection_id":"acme","reason":"on_demand"}`,
	} {
		t.Run(name, func(t *testing.T) {
			for _, typ := range []string{tasks.TypeValidate, tasks.TypeRefreshToken} {
				err := process(t, w, asynq.NewTask(typ, []byte(payload)))
				require.ErrorIs(t, err, asynq.SkipRetry)
				require.ErrorIs(t, err, tasks.ErrMalformed)
				require.Contains(t, err.Error(), "malformed payload")
			}
		})
	}
}

func TestValidateStaleVerdictDropped(t *testing.T) {
	b := setup(t)
	entered := make(chan struct{})
	release := make(chan struct{})
	b.p.handle("/acme/me", func(rw http.ResponseWriter, r *http.Request) {
		close(entered)
		<-release
		rw.WriteHeader(http.StatusUnauthorized)
	})
	b.put("crm+acme", acmeKey(), nil)
	w := b.worker()
	done := make(chan error, 1)
	go func() { done <- process(t, w, validateTask(t, "crm+acme")) }()
	<-entered
	// The consumer fixes the key while the (slow) check of the old one is
	// in flight.
	after := b.put("crm+acme", map[string]string{"api_key": "a-new-key"}, nil)
	close(release)
	require.NoError(t, <-done, "a stale verdict is dropped, not an error")
	c := b.get("crm+acme")
	require.Equal(t, after.Revision, c.Revision)
	require.Nil(t, c.Verdict, "the 401 for the old key was not applied")
	require.Equal(t, state.Added, c.State)
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.dropped.WithLabelValues(dropStale)))
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.checks.WithLabelValues("acme", outcomeInvalid)))
}

func TestValidateNeverReachesDisallowedHost(t *testing.T) {
	b := setup(t)
	bad := newProvider(t)
	bad.handle("/inst/me", status(200))
	bad.handle("/anything", status(200))
	// The store's catalog accepted the setting (it allowed both hosts
	// then); the worker's catalog allows only the provider.
	b.store = b.newStore(testCatalog(t, b.p.host, bad.host))
	b.put("crm+inst", acmeKey(), map[string]string{"instance_url": "http://" + bad.host})
	w := b.worker()

	t.Run("SettingsPointElsewhere", func(t *testing.T) {
		require.NoError(t, process(t, w, validateTask(t, "crm+inst")))
		c := b.get("crm+inst")
		require.Equal(t, state.Invalid, c.State)
		require.Equal(t, state.HealthMisconfigured, c.Health)
		require.Equal(t, state.ReasonMisconfiguredAccount, c.Verdict.Reason)
		require.Zero(t, bad.total())
	})
	t.Run("Redirect", func(t *testing.T) {
		b.p.handle("/acme/me", func(rw http.ResponseWriter, r *http.Request) {
			http.Redirect(rw, r, "http://"+bad.host+"/anything?api_key=leak", http.StatusFound)
		})
		b.put("crm+acme", acmeKey(), nil)
		require.NoError(t, process(t, w, validateTask(t, "crm+acme")), "the connection's problem: nothing to retry")
		c := b.get("crm+acme")
		require.Equal(t, state.Added, c.State, "a refused redirect is no verdict")
		require.Equal(t, state.HealthMisconfigured, c.Health)
		require.Contains(t, c.Transient.LastError, "redirect")
		require.NotContains(t, c.Transient.LastError, "leak")
		require.Equal(t, 1, b.p.count("/acme/me"))
		require.Zero(t, bad.total())
	})
	requireNoSecrets(t, b.logs.String())
	require.NotContains(t, b.logs.String(), "api_key=leak")
}

func TestValidateBodyCap(t *testing.T) {
	b := setup(t)
	var written atomic.Int64
	big := func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "application/json")
		_, _ = rw.Write([]byte(`{"user":{"id":1},"pad":"`))
		chunk := []byte(strings.Repeat("x", 64<<10))
		for range 1024 { // 64 MiB if anybody read it all
			n, err := rw.Write(chunk)
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
	}
	b.p.handle("/acme/me", big)
	b.p.handle("/zen/users/me.json", big)
	b.put("crm+acme", acmeKey(), nil)
	b.put("ticketing+zen", map[string]string{"username": "agent", "password": secretPassword}, nil)
	w := b.worker(func(c *Config) { c.MaxBodyBytes = 256 << 10 })

	require.NoError(t, process(t, w, validateTask(t, "crm+acme")))
	require.Equal(t, state.Callable, b.get("crm+acme").State, "no assertion: the status decides")
	require.Less(t, written.Load(), int64(16<<20), "the worker stopped reading at the cap")

	written.Store(0)
	err := process(t, w, validateTask(t, "ticketing+zen"))
	require.ErrorContains(t, err, "cap")
	require.Equal(t, state.Added, b.get("ticketing+zen").State, "an assertion over a truncated body is no verdict")
}

func TestValidateResultAndLogs(t *testing.T) {
	b := setup(t)
	b.p.handle("/qkey/me", func(rw http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("api_token") != secretAPIKey {
			rw.WriteHeader(http.StatusUnauthorized)
			return
		}
		rw.WriteHeader(http.StatusInternalServerError)
	})
	b.p.handle("/acme/me", status(200))
	b.put("crm+qkey", acmeKey(), nil)
	b.put("crm+acme", acmeKey(), nil)
	w := b.worker()
	b.start(w)
	ins := b.inspector()
	ok := b.enqueue(validateTask(t, "crm+acme"), asynq.Retention(time.Hour))
	fail := b.enqueue(validateTask(t, "crm+qkey"))

	var res Result
	eventually(t, 10*time.Second, func() bool {
		info, err := ins.GetTaskInfo(ok.Queue, ok.ID)
		if err != nil || info.State != asynq.TaskStateCompleted {
			return false
		}
		res = decodeResult(t, info.Result)
		return true
	}, "validation completed")
	require.Equal(t, tasks.TypeValidate, res.Task)
	require.Equal(t, outcomeValid, res.Outcome)
	require.Equal(t, "valid", res.Verdict)
	require.Equal(t, 200, res.HTTPStatus)
	require.Equal(t, "added", res.StateBefore)
	require.Equal(t, "callable", res.StateAfter)
	require.Positive(t, res.LatencyMS)

	eventually(t, 10*time.Second, func() bool {
		info, err := ins.GetTaskInfo(fail.Queue, fail.ID)
		if err != nil || info.State != asynq.TaskStateRetry || len(info.Result) == 0 {
			return false
		}
		res = decodeResult(t, info.Result)
		requireNoSecrets(t, info.LastErr)
		return true
	}, "validation retrying")
	require.Equal(t, outcomeTransient, res.Outcome)
	require.Equal(t, 500, res.HTTPStatus)
	require.Equal(t, "status 500", res.Error)

	logs := b.logs.String()
	requireNoSecrets(t, logs)
	require.NotContains(t, logs, "api_token=")
	for _, key := range []string{`"task_id":"` + ok.ID, `"task_type":"connection:validate"`, `"queue":"critical"`,
		`"connection_id":"crm+acme"`, `"integration":"acme"`, `"verdict":"valid"`, `"http_status":200`} {
		require.Contains(t, logs, key)
	}
}

func TestExtraHandlers(t *testing.T) {
	b := setup(t)
	got := make(chan string, 1)
	w := b.worker(func(c *Config) {
		c.Handlers = map[string]asynq.Handler{tasks.TypeWebhookDeliver: asynq.HandlerFunc(func(ctx context.Context, t *asynq.Task) error {
			q, _ := asynq.GetQueueName(ctx)
			got <- q
			return nil
		})}
	})
	require.Error(t, w.Handle(tasks.TypeWebhookDeliver, nopHandler{}), "no double registration")
	require.NoError(t, w.Handle("custom:thing", nopHandler{}))
	b.start(w)
	task, err := tasks.NewWebhookTask("1700000000000-0", "sub1")
	require.NoError(t, err)
	b.enqueue(task)
	select {
	case q := <-got:
		require.Equal(t, tasks.QueueEvents, q)
	case <-time.After(10 * time.Second):
		t.Fatal("webhook handler not called")
	}
	eventually(t, 5*time.Second, func() bool {
		return testutil.ToFloat64(w.metrics.tasksProcessed.WithLabelValues(tasks.QueueEvents, tasks.TypeWebhookDeliver, taskSuccess)) == 1
	}, "middleware counted the extra handler's task")
	require.Error(t, w.Handle("late:thing", nopHandler{}), "Handle after Run")
}

func TestValidateConfirmsInvalid(t *testing.T) {
	b := setup(t)
	b.p.handle("/confirmco/me", status(200))
	b.put("crm+confirmco", acmeKey(), nil)
	w := b.worker()
	require.NoError(t, process(t, w, validateTask(t, "crm+confirmco")))
	require.Equal(t, state.Callable, b.get("crm+confirmco").State)

	// One 401 is held back: the catalog asks for a confirming check.
	b.p.handle("/confirmco/me", status(401))
	require.NoError(t, process(t, w, validateTask(t, "crm+confirmco")))
	c := b.get("crm+confirmco")
	require.Equal(t, state.Callable, c.State)
	require.Equal(t, state.HealthPendingConfirmation, c.Health)
	ins := b.inspector()
	scheduled, err := ins.ListScheduledTasks(tasks.QueueDefault)
	require.NoError(t, err)
	require.Len(t, scheduled, 1, "a confirming check is scheduled")
	require.Equal(t, tasks.TypeValidate, scheduled[0].Type)
	require.WithinDuration(t, time.Now().Add(time.Second), scheduled[0].NextProcessAt, 2*time.Second)
	require.Contains(t, string(scheduled[0].Payload), `"reason":"confirm"`)

	// The confirming check runs after its spacing and flips the state.
	b.start(w)
	eventually(t, 10*time.Second, func() bool { return b.get("crm+confirmco").State == state.Invalid }, "confirmed invalid")
	require.Equal(t, 3, b.p.count("/confirmco/me"))
}
