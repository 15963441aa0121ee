package cli

import (
	"context"
	"io"

	"github.com/spf13/cobra"

	"github.com/onebox-project/onebox/testbed"
)

// memBenchCommands are 'onebox bench' subcommands of memory expansion. Stub.
func memBenchCommands() []*cobra.Command { return nil }

// demoMemory is the demo's memory expansion step. Stub.
func demoMemory(_ context.Context, _ io.Writer, _ *testbed.Cluster) error { return nil }
