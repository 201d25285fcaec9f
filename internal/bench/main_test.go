package bench

import (
	"testing"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
)

func TestMain(m *testing.M) { redistest.Main(m) }
