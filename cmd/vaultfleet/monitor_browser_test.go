package main

import (
	"context"
	"encoding/json"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/tasks"
)

// TestMonitorShowsTaskResult opens one completed task in the Asynq monitor
// of `vaultfleet dev`, in a real headless Chromium driven by chromedp, and
// reads the task's result JSON on the page: completed tasks are kept (task
// retention) so their results can be seen.
func TestMonitorShowsTaskResult(t *testing.T) {
	if testing.Short() {
		t.Skip("starts dev and a browser")
	}
	t.Parallel()
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		if os.Getenv("VAULTFLEET_SKIP_TOOLS") == "1" {
			t.Skip("chromium not installed; VAULTFLEET_SKIP_TOOLS=1 skips the browser check")
		}
		t.Fatal("chromium not installed: scripts/test.sh installs it (apt-get install chromium); VAULTFLEET_SKIP_TOOLS=1 skips")
	}
	base, _, errOut, _ := startDev(t, nil, "--consumers", "2")

	// The first validations of the seeded connections run on critical.
	var id string
	require.Eventually(t, func() bool {
		var v struct {
			Tasks []struct {
				ID     string `json:"id"`
				Type   string `json:"type"`
				Result string `json:"result"`
			} `json:"tasks"`
		}
		code, body := getBody(t, base+"/monitor/api/queues/"+tasks.QueueCritical+"/completed_tasks")
		if code != 200 || json.Unmarshal([]byte(body), &v) != nil {
			return false
		}
		for _, tk := range v.Tasks {
			if tk.Type == tasks.TypeValidate && strings.Contains(tk.Result, `"outcome"`) {
				id = tk.ID
				return true
			}
		}
		return false
	}, 30*time.Second, 200*time.Millisecond, "no completed validation in the monitor: %s", errOut)

	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(chromium),
		chromedp.NoSandbox, chromedp.Flag("disable-gpu", true), chromedp.UserDataDir(t.TempDir()))
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelA()
	bctx, cancelB := chromedp.NewContext(actx)
	defer cancelB()
	ctx, cancel := context.WithTimeout(bctx, 60*time.Second)
	defer cancel()

	page := base + "/monitor/queues/" + tasks.QueueCritical + "/tasks/" + url.PathEscape(id)
	var text string
	require.NoError(t, chromedp.Do(ctx, chromedp.Navigate(page)))
	require.Eventually(t, func() bool {
		var err error
		if text, err = chromedp.Run(ctx, chromedp.Text(chromedp.CSS("body"))); err != nil {
			return false
		}
		return strings.Contains(text, "Result") && strings.Contains(text, `"outcome": "`)
	}, 30*time.Second, 200*time.Millisecond, "task page %s shows no result", page)
	for _, want := range []string{id, "completed", `"state_after": "`, `"task": "connection:validate"`} {
		require.Contains(t, text, want, "task page %s", page)
	}
}
