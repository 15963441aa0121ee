package cli

import (
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/onebox-project/onebox/agent"
)

// memCommands are the memory pool verbs (issue 3): mem. Stub.
func memCommands() []*cobra.Command { return nil }

// memAgentFlags registers the agent's memory pool flags on f (values in
// cfg) and returns a func that copies the flags the user set into final.
func memAgentFlags(_ *pflag.FlagSet, _ *agent.Config) func(final *agent.Config) {
	return func(*agent.Config) {}
}

// poolBenchCommands are 'onebox bench' subcommands of the memory pool. Stub.
func poolBenchCommands() []*cobra.Command { return nil }
