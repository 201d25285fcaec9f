package worker

import (
	"testing"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
)

// Tests that use Redis do not run in parallel: each takes its own database
// of the package's private redis-server, and redistest hands databases out
// round-robin, so a long-lived parallel test could see its database
// flushed under it.
func TestMain(m *testing.M) { redistest.Main(m) }
