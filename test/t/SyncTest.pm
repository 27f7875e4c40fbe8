# Helpers shared by the TAP suites in test/t (see the POD below).
package SyncTest;

=pod

=head1 NAME

SyncTest - helpers shared by the TAP suites of the sync extension (test/t/*.pl)

=head1 SYNOPSIS

  use FindBin;
  use lib $FindBin::Bin;
  use SyncTest;

  my $F    = start_fake('salesforce', 'a', '--records', 300);
  my $node = start_node(max_backoff => 4);    # also CREATE EXTENSION sync
  sql("SELECT sync.create_source('acme', 'salesforce', '$F->{url}', ...)");
  ok(wait_sql(60, "SELECT count(*) = 300 FROM acme.contact"), 'backfill done');
  my $st = status_of('acme', 'Contact');
  admin($F, 'POST', 'records/Contact', { LastName => 'X' });

Plain exported functions. The node the SQL helpers talk to is set by start_node() or
use_node(); fakes started with start_fake() are killed when the suite ends.

=cut

use strict;
use warnings;

use Encode qw(decode decode_utf8 encode_utf8);
use Exporter 'import';
use File::Basename qw(dirname);
use File::Spec;
use HTTP::Tiny;
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster ();
use PostgreSQL::Test::Utils ();
use Time::HiRes qw(time usleep);

our @EXPORT = qw(
  start_fake admin admin_request http http_options
  start_node use_node sql sql_in sql_text row lit
  wait_until wait_sql status_of cursor_of elapsed
  urldecode qparams soql_of
  days_from_civil canon
);

my $t_start = time;
my $json = JSON::PP->new->utf8->canonical->allow_nonref;    # bytes <-> structures
my $jtext = JSON::PP->new->allow_nonref;                    # already decoded text -> structures
my $test_dir = File::Spec->rel2abs(dirname(__FILE__) . '/..');
my %fake_title = (salesforce => 'Salesforce', stripe => 'Stripe', hubspot => 'HubSpot', airtable => 'Airtable');

my @fakes;
my $http = HTTP::Tiny->new(timeout => 60);
my $node;
my $utf8 = 0;

# ---------------------------------------------------------------------------
# The fakes
# ---------------------------------------------------------------------------

=head2 start_fake($kind, $name, [\%options,] @args)

Start test/fake_$kind.py (salesforce, stripe, hubspot, airtable) with C<--port 0 @args>
and wait for it to print "listening on PORT". Its stderr goes to
tmp_check/log/fake_${kind}_$name.log. Returns C<< { name, h (the IPC::Run harness), url } >>.
Options: C<timeout> (seconds to wait for the port, default 90). Dies when the fake does
not start. Every fake started here is killed (kill_kill, grace 3 s) when the suite ends.

=cut

sub start_fake
{
	my ($kind, $name, @args) = @_;
	my %opt = ref $args[0] eq 'HASH' ? %{ shift @args } : ();
	my $title = $fake_title{$kind} // $kind;
	my $out = '';
	my $log = "$PostgreSQL::Test::Utils::log_path/fake_${kind}_$name.log";
	my $timeout = IPC::Run::timeout($opt{timeout} // 90);
	my $h = IPC::Run::start([ '/usr/bin/python3', "$test_dir/fake_$kind.py", '--port', '0', @args ],
		'<', \undef, '>', \$out, '2>', $log, $timeout);
	eval { $h->pump until $out =~ /listening on (\d+)/; };
	die "fake $title $name did not start: $@ $out" unless $out =~ /listening on (\d+)/;
	$timeout->reset;
	my $fake = { name => $name, h => $h, url => "http://127.0.0.1:$1" };
	push @fakes, $fake;
	return $fake;
}

END
{
	local $?;    # keep the test's exit status: reaping the fakes sets $?
	for my $f (@fakes)
	{
		eval { $f->{h}->kill_kill(grace => 3); };
	}
}

=head2 http() / http_options(%options)

http() is the HTTP::Tiny client admin() uses (for a suite's own calls to a fake's API).
http_options(%options) replaces it by a new client made with these options over the
default C<< timeout => 60 >> (e.g. C<< timeout => 15 >>, C<< keep_alive => 0 >>).

=cut

sub http { return $http; }

sub http_options
{
	my (%opt) = @_;
	$http = HTTP::Tiny->new(timeout => 60, %opt);
	return $http;
}

=head2 admin($fake, $method, $path, [$body]) / admin_request($decoder, $fake, $method, $path, [$body])

Call the fake's admin API: C<$method $fake-E<gt>{url}/__admin/$path>, $body (a structure)
sent as JSON. Returns the decoded answer; dies on an HTTP error. admin_request() decodes
the answer with the given JSON::PP object (e.g. one with allow_bignum).

=cut

sub admin_request
{
	my ($decoder, $fake, $method, $path, $body) = @_;
	my %opt = (headers => { 'Content-Type' => 'application/json' });
	$opt{content} = $json->encode($body) if defined $body;
	my $res = $http->request($method, "$fake->{url}/__admin/$path", \%opt);
	die "fake admin $method $path failed: $res->{status} $res->{content}\n" unless $res->{success};
	return $decoder->decode($res->{content});
}

sub admin { return admin_request($json, @_); }

# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

=head2 start_node(%options)

Create, configure and start the cluster 'main' with shared_preload_libraries = 'sync',
timezone = 'UTC', sync.launcher_naptime = 1, max_worker_processes = 16, make it the current
node (use_node) and, unless C<< create_extension => 0 >>, run CREATE EXTENSION sync in
database postgres. Options: C<max_backoff> (sets sync.max_backoff), C<initdb_extra>
(arrayref of initdb arguments), C<utf8> (see use_node). Returns the node.

=cut

sub start_node
{
	my (%opt) = @_;
	my $n = PostgreSQL::Test::Cluster->new('main');
	$n->init($opt{initdb_extra} ? (extra => $opt{initdb_extra}) : ());
	$n->append_conf('postgresql.conf',
		"shared_preload_libraries = 'sync'\n"
		  . "timezone = 'UTC'\n"
		  . "sync.launcher_naptime = 1\n"
		  . (defined $opt{max_backoff} ? "sync.max_backoff = $opt{max_backoff}\n" : '')
		  . "max_worker_processes = 16\n");
	$n->start;
	use_node($n, utf8 => $opt{utf8});
	sql('CREATE EXTENSION sync') if $opt{create_extension} // 1;
	return $n;
}

=head2 use_node($node, [utf8 => 1])

Make $node the node of sql(), sql_in(), row(), status_of() etc. With C<< utf8 => 1 >>
queries are passed as Perl character strings (encoded to UTF-8) and results come back
decoded (characters); otherwise both are bytes.

=cut

sub use_node
{
	my ($n, %opt) = @_;
	$node = $n;
	$utf8 = $opt{utf8} ? 1 : 0;
	return $node;
}

=head2 sql($query) / sql_in($db, $query) / sql_text($query)

safe_psql of $query in database postgres (sql) or $db (sql_in) of the current node: its
output, or die. sql_text() decodes the output from UTF-8 (for comparisons with
non-ASCII literals; not needed with use_node's utf8 mode).

=cut

sub sql_in
{
	my ($db, $query) = @_;
	return decode_utf8($node->safe_psql($db, encode_utf8($query))) if $utf8;
	return $node->safe_psql($db, $query);
}

sub sql { return sql_in('postgres', $_[0]); }

sub sql_text { return decode('UTF-8', sql($_[0])); }

=head2 row($query)

The one row of $query as a hash (via row_to_json), or {} when there is none.

=cut

sub row
{
	my ($query) = @_;
	my $r = sql("SELECT row_to_json(q) FROM ($query) q");
	return $r eq '' ? {} : ($utf8 ? $jtext : $json)->decode($r);
}

=head2 lit($string)

$string as an SQL string literal (quotes doubled).

=cut

sub lit
{
	my ($s) = @_;
	$s =~ s/'/''/g;
	return "'$s'";
}

=head2 wait_until($timeout, $code, [$interval])

Call $code every $interval seconds (default 0.2) until it returns true: 1, or 0 once
$timeout seconds have passed.

=cut

sub wait_until
{
	my ($timeout, $code, $interval) = @_;
	my $deadline = time + $timeout;
	while (1)
	{
		return 1 if $code->();
		return 0 if time > $deadline;
		usleep(($interval // 0.2) * 1_000_000);
	}
}

=head2 wait_sql($timeout, $query, [$interval])

wait_until() $query (in database postgres) returns 't', checking every $interval seconds
(default 0.2, as wait_until).

=cut

sub wait_sql
{
	my ($timeout, $query, $interval) = @_;
	return wait_until($timeout, sub { sql($query) eq 't' }, $interval);
}

=head2 status_of($source, $collection)

The collection's row of sync.status as a hash, or {} when there is none.

=cut

sub status_of
{
	my ($source, $collection) = @_;
	return row('SELECT * FROM sync.status WHERE source = ' . lit($source) . ' AND collection = ' . lit($collection));
}

=head2 cursor_of($source, $collection)

The collection's sync.collection_state.cursor, decoded.

=cut

sub cursor_of
{
	my ($source, $collection) = @_;
	return ($utf8 ? $jtext : $json)->decode(sql("SELECT st.cursor FROM sync.collection_state st JOIN sync.collections c "
		  . "ON c.id = st.collection_id JOIN sync.sources s ON s.id = c.source_id "
		  . 'WHERE s.name = ' . lit($source) . ' AND c.name = ' . lit($collection)));
}

=head2 elapsed()

Seconds since the suite started, as "12s" (for notes).

=cut

sub elapsed { return sprintf('%.0fs', time - $t_start); }

# ---------------------------------------------------------------------------
# The fakes' request logs
# ---------------------------------------------------------------------------

=head2 urldecode($s) / qparams($entry) / soql_of($entry)

urldecode(): %XX and + decoded (bytes). qparams(): the query parameters of a logged
request (C<< $entry->{query} >>) as a hashref, the last value of a repeated one winning.
soql_of(): the SOQL (parameter q) of a logged Salesforce query request, or undef.

=cut

sub urldecode
{
	my ($s) = @_;
	$s =~ tr/+/ /;
	$s =~ s/%([0-9A-Fa-f]{2})/chr(hex($1))/eg;
	return $s;
}

sub qparams
{
	my ($e) = @_;
	my %p;
	for my $pair (split /&/, $e->{query} // '')
	{
		my ($k, $v) = split /=/, $pair, 2;
		$p{ urldecode($k) } = urldecode($v // '');
	}
	return \%p;
}

sub soql_of
{
	my ($e) = @_;
	for my $pair (split /&/, $e->{query} // '')
	{
		my ($k, $v) = split /=/, $pair, 2;
		return urldecode($v // '') if urldecode($k) eq 'q';
	}
	return undef;
}

# ---------------------------------------------------------------------------
# Independent conversion of API values
# ---------------------------------------------------------------------------

=head2 days_from_civil($year, $month, $day)

Days since 1970-01-01 of a (proleptic Gregorian) date, computed in Perl.

=cut

sub days_from_civil
{
	my ($y, $m, $d) = @_;
	$y -= 1 if $m <= 2;
	my $era = int($y / 400);
	my $yoe = $y - $era * 400;
	my $doy = int((153 * ($m > 2 ? $m - 3 : $m + 9) + 2) / 5) + $d - 1;
	my $doe = $yoe * 365 + int($yoe / 4) - int($yoe / 100) + $doy;
	return $era * 146097 + $doe - 719468;
}

=head2 canon($structure)

A decoded JSON structure with numbers, strings and booleans told apart ("num:1",
"str:1", "bool:true"), numbers normalised to 15 significant digits; for comparing
structures with $json->encode(canon(...)).

=cut

sub canon
{
	my ($v) = @_;
	return undef unless defined $v;
	return { map { $_ => canon($v->{$_}) } keys %$v } if ref $v eq 'HASH';
	return [ map { canon($_) } @$v ] if ref $v eq 'ARRAY';
	return $v ? 'bool:true' : 'bool:false' if JSON::PP::is_bool($v);
	my $enc = JSON::PP->new->allow_nonref->encode($v);    # before anything stringifies $v
	return $enc =~ /^"/ ? "str:$v" : 'num:' . sprintf('%.15g', $v);
}

1;
