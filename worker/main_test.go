package worker

import (
	"testing"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
)

// Tests that use Redis take a database of the package's private
// redis-server each (redistest hands one to a single test at a time).
func TestMain(m *testing.M) { redistest.Main(m) }
