# HubSpot sync against the fake portal in test/fake_hubspot.py:
#   1. the backfill (OAuth) copies every contact, company, deal and car (custom object)
#      exactly: every record of the fake's dump, every column of sync.columns, value by value;
#   2. creates, updates, archives (recycle-bin walk) and a merge reach the tables; the search
#      lag is survived by the overlap re-read (an update stamped before one already synced
#      still arrives); 10,500 contacts modified in one millisecond (more than the 10,000
#      results one search query can reach) all arrive, and no search pages past 10,000;
#   3. an OAuth token expiring mid-run is refreshed after the 401, with no error recorded;
#   4. 429s, 502s and a bad refresh token are recorded as errors, the worker keeps running
#      and recovers;
#   5. an unknown object type fails add_collection at call time; a private-app token works.
# Expected values come from the fake's records, converted independently in Perl.
use strict;
use warnings;

use Encode qw(decode);
use FindBin;
use lib $FindBin::Bin;
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use SyncTest;
use Test::More;
use Time::HiRes qw(time);

my $json = JSON::PP->new->utf8->canonical->allow_nonref;
my $creds = '{"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "test-refresh"}';
my $PAT = 'pat-na1-11111111-2222-3333-4444-555555555555';    # the fake's --private-app-token default
my $LAG = 10;                                                 # search lag (s) for sections 2 and 2b
my $N_CONTACTS = 11000;
my $N_BULK = 10500;
my $node;    # set up below; start_fake, admin, sql, wait_sql, status_of etc. are in SyncTest.pm

# ---------------------------------------------------------------------------
# Helpers: the fake's API, dump and request log
# ---------------------------------------------------------------------------

# A GET of the public API with the private-app token (not OAuth, so the sync's token is untouched).
sub api_get
{
	my ($fake, $path) = @_;
	my $res = http()->get("$fake->{url}$path", { headers => { Authorization => "Bearer $PAT" } });
	die "GET $path: $res->{status} $res->{content}" unless $res->{success};
	return $json->decode($res->{content});
}

# The fake's dump, flattened by Python's C JSON parser (JSON::PP needs 15 s and more for the
# 10 MB of 11,000 contacts on a busy machine). Only the transport is parsed there: one line per
# record, "type US id US name GS value US ...", values as the API sends them (strings or null),
# backslash and separators escaped. Every conversion stays in Perl.
my $PY_DUMP = <<'PY';
import json, sys, urllib.request
dump = json.load(urllib.request.urlopen(sys.argv[1] + "/__admin/dump", timeout=120))
def esc(v):
    v = v.replace("\\", "\\\\")
    for c in "\x00\x1d\x1e\x1f":
        v = v.replace(c, "\\x%02x" % ord(c))
    return v
out = []
for t, recs in dump["objects"].items():
    for r in recs:
        if r["archived"] or r["mergedInto"] is not None:
            continue
        f = [t, esc(r["id"])] + [esc(k) if v is None else esc(k) + "\x1d" + esc(v)
                                 for k, v in sorted(r["properties"].items())]
        out.append("\x1f".join(f))
sys.stdout.buffer.write("\x1e".join(out).encode("utf-8"))
PY

sub unesc
{
	my ($v) = @_;
	$v =~ s/\\(\\|x([0-9a-f]{2}))/defined $2 ? chr(hex $2) : '\\'/ge if index($v, '\\') >= 0;
	return $v;
}

# type -> [ {id, properties => {name => string or undef}} ] of the live records (neither
# archived nor merged away) in the fake's admin dump.
sub dump_live
{
	my ($fake) = @_;
	my $out = '';
	IPC::Run::run([ '/usr/bin/python3', '-c', $PY_DUMP, $fake->{url} ], '<', \undef, '>', \$out,
		IPC::Run::timeout(180))
	  or die "reading the dump of fake $fake->{name} failed: $?";
	my %live;
	for my $line (split /\x1e/, decode('UTF-8', $out))
	{
		my ($type, $id, @props) = split /\x1f/, $line, -1;
		my %p;
		for my $kv (@props)
		{
			my ($k, $v) = split /\x1d/, $kv, 2;
			$p{ unesc($k) } = defined $v ? unesc($v) : undef;
		}
		push @{ $live{$type} }, { id => unesc($id), properties => \%p };
	}
	return \%live;
}

sub log_since
{
	my ($fake, $since) = @_;
	return [ grep { $_->{t} >= $since } @{ admin($fake, 'GET', 'requests') } ];
}

sub search_type { return $_[0]{method} eq 'POST' && $_[0]{path} =~ m{^/crm/v3/objects/([^/]+)/search$} ? $1 : ''; }
sub list_type   { return $_[0]{method} eq 'GET' && $_[0]{path} =~ m{^/crm/v3/objects/([^/]+)$} ? $1 : ''; }
sub is_token    { return $_[0]{path} eq '/oauth/v1/token'; }
sub filters_of  { return @{ $_[0]{body}{filterGroups}[0]{filters} // [] }; }

# A search of the tie walk: that timestamp EQ, hs_object_id GT.
sub is_tie
{
	return scalar grep { $_->{propertyName} eq 'hs_object_id' && $_->{operator} eq 'GT' } filters_of($_[0]);
}

sub brief_entry
{
	my ($e) = @_;
	return "$e->{method} $e->{path} -> $e->{status}";
}

# ---------------------------------------------------------------------------
# Helpers: independent conversion of HubSpot's string values, and table comparison
# ---------------------------------------------------------------------------

# Epoch milliseconds of a HubSpot datetime ("2024-05-01T12:34:56.789Z" or "…56Z").
sub hs_epoch_ms
{
	my ($s) = @_;
	my @p = $s =~ /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{3}))?Z$/ or return undef;
	return ((days_from_civil($p[0], $p[1], $p[2]) * 24 + $p[3]) * 60 + $p[4]) * 60_000 + $p[5] * 1000
	  + ($p[6] // 0);
}

# A decimal as canonical text: no leading zeros, no trailing fractional zeros, no "-0".
sub canon_decimal
{
	my ($s) = @_;
	my ($sign, $int, $frac) = $s =~ /^([-+]?)(\d+)(?:\.(\d*))?$/ or return "bad-number:$s";
	$int =~ s/^0+(?=\d)//;
	$frac //= '';
	$frac =~ s/0+$//;
	my $r = length($frac) ? "$int.$frac" : $int;
	return ($sign eq '-' && $r =~ /[1-9]/) ? "-$r" : $r;
}

# What a property's values must become, from its metadata in the properties API.
sub kind_of_property
{
	my ($p) = @_;
	return 'number' if $p->{type} eq 'number';
	return 'bool' if $p->{type} eq 'bool';
	return 'date' if $p->{type} eq 'date';
	return 'datetime' if $p->{type} eq 'datetime';
	return 'multi' if $p->{type} eq 'enumeration' && ($p->{fieldType} // '') eq 'checkbox';
	return 'text';
}

my %PG_TYPE = (id => 'bigint', number => 'numeric', bool => 'boolean', date => 'date',
	datetime => 'timestamp with time zone', multi => 'text[]', text => 'text');

# The expected value of an API string, as a comparable string.
sub expect_canon
{
	my ($kind, $v) = @_;
	return 'NULL' unless defined $v;
	return $v =~ /^\d+$/ ? 'i:' . canon_decimal($v) : "bad-api-id:$v" if $kind eq 'id';
	return 'n:' . canon_decimal($v) if $kind eq 'number';
	return $v eq 'true' ? 'b:t' : $v eq 'false' ? 'b:f' : "bad-api-bool:$v" if $kind eq 'bool';
	return $v =~ /^\d{4}-\d\d-\d\d$/ ? "d:$v" : "bad-api-date:$v" if $kind eq 'date';
	if ($kind eq 'datetime')
	{
		my $ms = hs_epoch_ms($v);
		return defined $ms ? "e:$ms" : "bad-api-datetime:$v";
	}
	return 'a:' . $json->encode([ split /;/, $v ]) if $kind eq 'multi';
	return "s:$v";
}

# The table's value (text rendered by table_rows) as a comparable string.
sub got_canon
{
	my ($kind, $g) = @_;
	return 'NULL' unless defined $g;
	return 'i:' . canon_decimal($g) if $kind eq 'id';
	return 'n:' . canon_decimal($g) if $kind eq 'number';
	return $g eq 'true' ? 'b:t' : $g eq 'false' ? 'b:f' : "bad-bool:$g" if $kind eq 'bool';
	return "d:$g" if $kind eq 'date';
	return $g =~ /^(-?\d+)(?:\.0*)?$/ ? "e:$1" : "bad-epoch-ms:$g" if $kind eq 'datetime';
	if ($kind eq 'multi')
	{
		my $a = eval { JSON::PP->new->decode($g) };
		return ref($a) eq 'ARRAY' ? 'a:' . $json->encode($a) : "bad-array:$g";
	}
	return "s:$g";
}

# Column name -> SQL type of a table.
sub column_types
{
	my ($table) = @_;
	return $json->decode(sql("SELECT json_object_agg(attname, format_type(atttypid, atttypmod)) FROM pg_attribute "
		  . "WHERE attrelid = '$table'::regclass AND attnum > 0 AND NOT attisdropped"));
}

# The fields of a collection: sync.columns plus the kind its API property calls for.
sub fields_of
{
	my ($source, $collection, $kinds) = @_;
	my $cols = $json->decode(sql(
		"SELECT json_agg(json_build_object('api_field', api_field, 'api_type', api_type, 'column_name', column_name, "
		  . "'column_type', column_type, 'is_key', is_key, 'is_version', is_version) ORDER BY position) "
		  . "FROM sync.columns WHERE source = '$source' AND collection = '$collection'"));
	return [ map { { %$_, kind => $_->{api_field} eq 'id' ? 'id' : $kinds->{ $_->{api_field} } // 'unknown' } }
		  @$cols ];
}

# id -> {api_field -> text or undef}: datetimes as epoch ms (extract(epoch)*1000), dates as
# YYYY-MM-DD, arrays as JSON, the rest as ::text. Fields are rendered by the column's real type.
sub table_rows
{
	my ($table, $fields) = @_;
	my $types = column_types($table);
	my @present = grep { defined $types->{ $_->{column_name} } } @$fields;
	my @exprs;
	for my $f (@present)
	{
		my $c = qq{"$f->{column_name}"};
		my $t = $types->{ $f->{column_name} };
		my $e =
		    $t eq 'timestamp with time zone' ? "(extract(epoch FROM $c) * 1000)::text"
		  : $t eq 'date' ? "to_char($c, 'YYYY-MM-DD')"
		  : $t =~ /\[\]$/ ? "array_to_json($c)::text"
		  : "${c}::text";
		push @exprs, "coalesce('v' || $e, 'n')";
	}
	my $out = sql_text("SELECT string_agg(concat_ws(E'\\x1f', " . join(', ', @exprs) . "), E'\\x1e') FROM $table");
	my %rows;
	for my $line (split /\x1e/, $out)
	{
		my @v = split /\x1f/, $line, -1;
		my %r;
		for my $i (0 .. $#present)
		{
			my $x = $v[$i] // 'n';
			$r{ $present[$i]{api_field} } = $x eq 'n' ? undef : substr($x, 1);
		}
		$rows{ canon_decimal($r{id} // 'missing-id') } = \%r;
	}
	return \%rows;
}

# Compare a synced table with the fake's live records, every column of every record.
sub compare_table
{
	my ($label, $table, $fields, $records) = @_;
	my $got = table_rows($table, $fields);
	my $n = sql("SELECT count(*) FROM $table");
	my %exp = map { canon_decimal($_->{id}) => $_ } @$records;
	my (@missing, @extra, @diff);
	my $values = 0;
	for my $id (sort { $a <=> $b } keys %exp)
	{
		my $g = $got->{$id};
		if (!$g)
		{
			push @missing, $id;
			next;
		}
		for my $f (@$fields)
		{
			my $api = $f->{api_field} eq 'id' ? $exp{$id}{id} : $exp{$id}{properties}{ $f->{api_field} };
			my $want = expect_canon($f->{kind}, $api);
			my $have = got_canon($f->{kind}, $g->{ $f->{api_field} });
			$values++;
			push @diff, "$id $f->{api_field} ($f->{kind}): table $have, API $want" if $have ne $want;
		}
	}
	for my $id (sort { $a <=> $b } keys %$got)
	{
		push @extra, $id unless $exp{$id};
	}
	is($n, scalar(@$records), "$label: " . scalar(@$records) . ' rows');
	is(scalar(@missing), 0, "$label: no API record missing from the table")
	  or diag("missing: @missing[0 .. ($#missing < 9 ? $#missing : 9)]");
	is(scalar(@extra), 0, "$label: no row the API does not have")
	  or diag("extra: @extra[0 .. ($#extra < 9 ? $#extra : 9)]");
	is(scalar(@diff), 0, "$label: all $values values equal the API's")
	  or diag(join("\n", @diff[0 .. ($#diff < 19 ? $#diff : 19)]));
	return $got;
}

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

is(hs_epoch_ms('1970-01-01T00:00:00Z'), 0, 'datetime helper: epoch 0');
is(hs_epoch_ms('2024-05-01T12:34:56.789Z'), 1714566896789, 'datetime helper: a known instant');
is(hs_epoch_ms('2024-02-29T00:00:00.001Z') - hs_epoch_ms('2024-02-28T00:00:00Z'), 86_400_001,
	'datetime helper: a leap day');
is(canon_decimal('0012.5000') . ' ' . canon_decimal('-0.0') . ' ' . canon_decimal('100'), '12.5 0 100',
	'decimal helper');

my $A = start_fake('hubspot', 'a', { timeout => 120 }, '--contacts', $N_CONTACTS, '--seed', 1, '--search-lag', $LAG);
my $B = start_fake('hubspot', 'b', { timeout => 120 }, '--contacts', 30, '--companies', 10, '--deals', 250,
	'--cars', 3, '--archived', 2, '--seed', 2, '--search-lag', 1);

# (start_node also runs CREATE EXTENSION sync)
$node = start_node(max_backoff => 2, initdb_extra => [ '--encoding=UTF8', '--locale=C' ]);

# Property metadata from the fake's properties API: the reference for the expected conversions.
my %TYPE_OF = (contacts => 'contacts', companies => 'companies', deals => 'deals', cars => 'p_cars');
my (%kinds, %props);
for my $c (sort keys %TYPE_OF)
{
	my $res = api_get($A, "/crm/v3/properties/$c");
	$props{$c} = [ grep { !$_->{archived} } @{ $res->{results} } ];
	$kinds{$c} = { map { $_->{name} => kind_of_property($_) } @{ $props{$c} } };
}

# ---------------------------------------------------------------------------
# 1. Backfill of contacts, companies, deals and cars (OAuth)
# ---------------------------------------------------------------------------

my $t_backfill = time;
sql("SELECT sync.create_source('crm', 'hubspot', '$A->{url}', '$creds', "
	  . "'{\"requests_per_second\": 4, \"poll_interval\": 1, \"overlap\": 60}')");
is(sql("SELECT sync.add_collection('crm', 'contacts')"), 'crm.contacts', 'add_collection creates crm.contacts');
for my $c (qw(companies deals cars))
{
	# The small collections poll less often, leaving the budget to contacts.
	is(sql("SELECT sync.add_collection('crm', '$c', '{\"poll_interval\": 5}')"), "crm.$c",
		"add_collection creates crm.$c");
}
for my $c (qw(companies deals cars contacts))
{
	is(sql("SELECT sync.wait_for_backfill('crm', '$c', '300s')"), 't', "crm $c: backfill completes");
}
note(sprintf('backfill of %d contacts and the rest took %.1fs (at %s)', $N_CONTACTS, time - $t_backfill, elapsed()));

my $live = dump_live($A);
is(scalar(@{ $live->{contacts} }), $N_CONTACTS, "the fake holds $N_CONTACTS live contacts");
my %fields;
for my $c (sort keys %TYPE_OF)
{
	my $records = $live->{ $TYPE_OF{$c} };
	my $st = status_of('crm', $c);
	is($st->{state}, 'syncing', "crm $c: state syncing after the backfill");
	is($st->{phase}, 'incremental', "crm $c: phase incremental");
	is($st->{backfill_records}, scalar(@$records), "crm $c: backfill_records = " . scalar(@$records));
	ok(!defined $st->{last_error} && $st->{consecutive_failures} == 0, "crm $c: no error recorded")
	  or diag('last_error: ' . ($st->{last_error} // 'none'));

	$fields{$c} = fields_of('crm', $c, $kinds{$c});
	my @f = @{ $fields{$c} };
	my @names = ('id', map { $_->{name} } @{ $props{$c} });
	is(join(',', sort map { $_->{api_field} } @f), join(',', sort @names),
		"crm $c: sync.columns lists id and every property of the properties API");
	my $types = column_types("crm.$c");
	my @bad;
	for my $f (@f)
	{
		my $want = $PG_TYPE{ $f->{kind} } // "?$f->{kind}";
		my $have = $types->{ $f->{column_name} } // 'no such column';
		push @bad, "$f->{api_field} ($f->{kind}): $have, want $want" if $have ne $want;
	}
	is(scalar(@bad), 0, "crm $c: every column has the type its property calls for") or diag(join("\n", @bad));
	my $version = $c eq 'contacts' ? 'lastmodifieddate' : 'hs_lastmodifieddate';
	is(join(',', map { $_->{api_field} } grep { $_->{is_version} } @f), $version, "crm $c: $version is the version");
	is(sql("SELECT string_agg(a.attname, ',') FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
		  . "AND a.attnum = ANY (i.indkey) WHERE i.indrelid = 'crm.$c'::regclass AND i.indisprimary"),
		'id', "crm $c: id is the primary key");

	compare_table("backfill of crm.$c", "crm.$c", \@f, $records);
}
{
	# Precondition of the type checks: the data exercises every kind of conversion.
	my %seen;
	for my $c (sort keys %TYPE_OF)
	{
		for my $f (@{ $fields{$c} })
		{
			$seen{ $f->{kind} }++ if grep {
				defined($f->{api_field} eq 'id' ? $_->{id} : $_->{properties}{ $f->{api_field} })
			} @{ $live->{ $TYPE_OF{$c} } };
		}
	}
	is(join(',', sort keys %seen), 'bool,date,datetime,id,multi,number,text', 'the records hold values of every kind');
}
{
	my $log = log_since($A, $t_backfill);
	my @lists = grep { list_type($_) eq 'contacts' && !qparams($_)->{archived} } @$log;
	is(scalar(@lists), int(($N_CONTACTS + 99) / 100), 'contacts backfill: one list request per 100 records');
	is(scalar(grep { $_->{status} != 200 } @lists), 0, 'contacts backfill: every page answered 200');
	my @after = map { qparams($_)->{after} } @lists;
	ok(!defined $after[0], 'contacts backfill: the first page has no after');
	my @bad = grep { !defined $after[$_] || $after[$_] !~ /^\d+$/ || ($_ > 1 && $after[$_] <= $after[ $_ - 1 ]) }
	  1 .. $#after;
	is(scalar(@bad), 0, 'contacts backfill: after cursors follow one another, ascending');
	my %want_props = map { $_->{api_field} => 1 } grep { !$_->{is_key} } @{ $fields{contacts} };
	my @bad_props = grep
	{
		my $q = qparams($_);
		($q->{limit} // '') ne '100'
		  || join(',', sort split /,/, $q->{properties} // '') ne join(',', sort keys %want_props)
	} @lists;
	is(scalar(@bad_props), 0, 'contacts backfill: limit=100 and every synced property asked for');
	my @tokens = grep { is_token($_) } @$log;
	is(join(',', map { "$_->{method} $_->{status}" } @tokens), 'POST 200',
		'one OAuth token request served the describes and the backfills');
	is(scalar(grep { $_->{status} == 401 || $_->{status} == 429 } @$log), 0, 'no request met a 401 or 429');
}
note('section 1 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 2. Creates, updates, archives and a merge (search lag $LAG s, overlap 60 s)
# ---------------------------------------------------------------------------

sql(q{SELECT sync.alter_source('crm', options => '{"deleted_interval": 4}')});
is(sql("SELECT options::text FROM sync.sources WHERE name = 'crm'"),
	'{"overlap": 60, "poll_interval": 1, "deleted_interval": 4, "requests_per_second": 4}',
	'alter_source merges deleted_interval into the options');

my %col = map { $_->{api_field} => qq{"$_->{column_name}"} } @{ $fields{contacts} };
my @ids = map { $_->{id} } @{ $live->{contacts} };
my ($R1, $R2, $A1, $M1, $M2, $Z, $W) = @ids[ 10, 20, 30, 40, 50, 60, 70 ];
my @companies = map { $_->{id} } @{ $live->{companies} };
my @deals = map { $_->{id} } @{ $live->{deals} };
my @cars = map { $_->{id} } @{ $live->{p_cars} };
my $t_changes = time;

my $N1 = admin($A, 'POST', 'records/contacts', { properties => {
	email => 'neu.kontakt@example.com', firstname => "Zo\x{eb}", lastname => qq{O'Brien "Q" \\ \x{6e21}\x{8fba}},
	phone => '+1 415 555 0100', jobtitle => 'Head of "Growth"', company => 'Acme',
	notes => "line one\nline two\ttab \x{2014} \x{1f389}", lifecyclestage => 'lead', hs_lead_status => 'NEW',
	interests => 'sports;art', vip => 'true', date_of_birth => '1999-12-31', lifetime_value => '0.01',
	hs_analytics_num_visits => '7' } })->{id};
my $N2 = admin($A, 'POST', 'records/contacts', { properties => { email => 'zwei@example.com' } })->{id};
admin($A, 'PATCH', "records/contacts/$R1", { properties => {
	firstname => "\x{c4}nne", email => 'r1.new@example.com', interests => [ 'music', 'food_wine', 'technology' ],
	vip => 'false', lifetime_value => '-12.345', date_of_birth => '2000-02-29', lifecyclestage => 'customer',
	notes => qq{tab\t"quoted" \\ back 'single'} } });
admin($A, 'PATCH', "records/contacts/$R2", { properties => {
	map { $_ => undef } qw(firstname email interests vip date_of_birth lifetime_value phone jobtitle) } });
admin($A, 'DELETE', "records/contacts/$A1");
my $M3 = admin($A, 'POST', 'merge/contacts', { primaryObjectId => $M1, objectIdToMerge => $M2 })->{id};
ok($M3 ne $M1 && $M3 ne $M2, "the merge of $M1 and $M2 made a new contact $M3");

my $CO_NEW = admin($A, 'POST', 'records/companies', { properties => {
	name => 'Neue GmbH', domain => 'neue.example.com', industry => 'RETAIL', numberofemployees => '25000',
	annualrevenue => '1234567.89', is_public => 'true', founded_year => '1999', description => "Z\x{fc}rich\nline 2",
	city => "Z\x{fc}rich", country => 'Switzerland' } })->{id};
my $CO1 = $companies[5];
admin($A, 'PATCH', "records/companies/$CO1", { properties => {
	annualrevenue => '0.50', is_public => 'false', numberofemployees => undef } });

my $D1 = $deals[3];
admin($A, 'PATCH', "records/deals/$D1", { properties => {
	closedate => '2025-06-30T23:59:59.999Z', deal_tags => 'upsell;urgent', amount => '1000000.5',
	dealstage => 'closedwon' } });
my $D_NEW = admin($A, 'POST', 'records/deals', { properties => {
	dealname => "Neu \x{2014} pilot", amount => '42', dealstage => 'appointmentscheduled', pipeline => 'default',
	closedate => '2026-01-01T00:00:00Z' } })->{id};
my $D_ARCH = $deals[7];
admin($A, 'DELETE', "records/deals/$D_ARCH");

my $C_NEW = admin($A, 'POST', 'records/cars', { properties => {
	name => 'Trabant #1', vin => 'VIN00000000000042', year => '1964', price => '1234.56', color => 'blue',
	features => 'sunroof;awd', in_stock => 'false', purchase_date => '2001-09-09',
	last_service => '2024-02-29T12:00:00.001Z' } })->{id};
my $C1 = $cars[2];
admin($A, 'PATCH', "records/cars/$C1", { properties => {
	features => undef, price => '99999.99', last_service => '2025-01-01T00:00:00Z' } });
my $C_ARCH = $cars[4];
admin($A, 'DELETE', "records/cars/$C_ARCH");

my %cc = map { $_->{api_field} => qq{"$_->{column_name}"} } @{ $fields{companies} };
my %dc = map { $_->{api_field} => qq{"$_->{column_name}"} } @{ $fields{deals} };
my %kc = map { $_->{api_field} => qq{"$_->{column_name}"} } @{ $fields{cars} };
my %change_checks = (
	'new contacts arrive' => "SELECT count(*) = 2 FROM crm.contacts WHERE id IN ($N1, $N2)",
	'an updated contact arrives' => "SELECT $col{email} = 'r1.new\@example.com' FROM crm.contacts WHERE id = $R1",
	'properties cleared in the API are NULL' =>
	  "SELECT $col{firstname} IS NULL AND $col{interests} IS NULL AND $col{vip} IS NULL FROM crm.contacts WHERE id = $R2",
	'an archived contact is removed (recycle-bin walk)' => "SELECT NOT EXISTS (SELECT 1 FROM crm.contacts WHERE id = $A1)",
	'both merged-away contacts are removed' => "SELECT NOT EXISTS (SELECT 1 FROM crm.contacts WHERE id IN ($M1, $M2))",
	'the merged contact is present' =>
	  "SELECT $col{hs_merged_object_ids} = ARRAY['$M1', '$M2'] FROM crm.contacts WHERE id = $M3",
	'a new company arrives' => "SELECT EXISTS (SELECT 1 FROM crm.companies WHERE id = $CO_NEW)",
	'an updated company arrives' => "SELECT $cc{annualrevenue} = 0.5 FROM crm.companies WHERE id = $CO1",
	'an updated deal arrives' => "SELECT $dc{dealstage} = 'closedwon' FROM crm.deals WHERE id = $D1",
	'a new deal arrives' => "SELECT EXISTS (SELECT 1 FROM crm.deals WHERE id = $D_NEW)",
	'an archived deal is removed' => "SELECT NOT EXISTS (SELECT 1 FROM crm.deals WHERE id = $D_ARCH)",
	'a new car arrives' => "SELECT EXISTS (SELECT 1 FROM crm.cars WHERE id = $C_NEW)",
	'an updated car arrives' => "SELECT $kc{price} = 99999.99 FROM crm.cars WHERE id = $C1",
	'an archived car is removed' => "SELECT NOT EXISTS (SELECT 1 FROM crm.cars WHERE id = $C_ARCH)");
ok(wait_sql(120, 'SELECT ' . join(' AND ', map { "coalesce(($_), false)" } values %change_checks)),
	'every change reaches the tables');
for my $name (sort keys %change_checks)
{
	is(sql($change_checks{$name}), 't', $name);
}
note('changes synced at ' . elapsed());

$live = dump_live($A);
for my $c (sort keys %TYPE_OF)
{
	compare_table("crm.$c after the changes", "crm.$c", $fields{$c}, $live->{ $TYPE_OF{$c} });
}
{
	my $st = status_of('crm', 'contacts');
	is($st->{records_deleted}, 3, 'contacts: records_deleted = 3 (one archived, two merged away)');
	my $log = log_since($A, $t_changes);
	ok(scalar(grep { list_type($_) eq 'contacts' && (qparams($_)->{archived} // '') eq 'true' && $_->{status} == 200 }
			@$log), 'the contacts recycle bin (archived=true) was listed');
}

# ---------------------------------------------------------------------------
# 2b. The search lag: an update is invisible to search for $LAG s but arrives; one stamped
#     before a change already synced arrives too, thanks to the overlap re-read
# ---------------------------------------------------------------------------

my $t_z = time;
my $z_ms = hs_epoch_ms(admin($A, 'PATCH', "records/contacts/$Z", { properties => { jobtitle => 'Lag test Z' } })
	  ->{properties}{lastmodifieddate});
ok(wait_sql(90, "SELECT $col{jobtitle} = 'Lag test Z' FROM crm.contacts WHERE id = $Z"), 'lag: Z arrives');
my $z_synced = sql("SELECT extract(epoch FROM _synced_at) FROM crm.contacts WHERE id = $Z");
cmp_ok($z_synced - $t_z, '>=', $LAG - 0.5, sprintf('lag: Z arrived only after the search lag (%.1fs)', $z_synced - $t_z));
{
	my @early = grep { search_type($_) eq 'contacts' && $_->{status} == 200 && $_->{t} < $t_z + $LAG - 1 }
	  @{ log_since($A, $t_z) };
	cmp_ok(scalar(@early), '>=', 2, 'lag: contacts were searched while Z was not searchable yet');
}
cmp_ok(cursor_of('crm', 'contacts')->{ts} // 0, '>=', $z_ms, "lag: the cursor's newest stamp is Z's or later");

# W is stamped one second before Z (an index write that lands out of order).
my $t_w = time;
my $w_ms = $z_ms - 1000;
my $wrec = admin($A, 'PATCH', "records/contacts/$W", { properties => { jobtitle => 'Lag test W' }, at => $w_ms });
is(hs_epoch_ms($wrec->{properties}{lastmodifieddate}), $w_ms, 'lag: W is stamped before Z');
ok(wait_sql(90, "SELECT $col{jobtitle} = 'Lag test W' FROM crm.contacts WHERE id = $W"),
	'lag: W arrives although it is older than the newest stamp already synced');
my $w_synced = sql("SELECT extract(epoch FROM _synced_at) FROM crm.contacts WHERE id = $W");
cmp_ok($w_synced - $t_w, '>=', $LAG - 0.5, sprintf('lag: W arrived only after the search lag (%.1fs)', $w_synced - $t_w));
is(sql("SELECT (extract(epoch FROM $col{lastmodifieddate}) * 1000)::bigint FROM crm.contacts WHERE id = $W"), $w_ms,
	'lag: W has its own stamp');
{
	my @walks = grep { search_type($_) eq 'contacts' && !is_tie($_) && $_->{t} >= $t_w + $LAG - 1 && $_->{t} <= $w_synced }
	  @{ log_since($A, $t_w) };
	my @covering = grep
	{
		my ($f) = filters_of($_);
		$f && $f->{propertyName} eq 'lastmodifieddate'
		  && (($f->{operator} eq 'GTE' && $f->{value} <= $w_ms) || ($f->{operator} eq 'GT' && $f->{value} < $w_ms))
	} @walks;
	ok(scalar(@covering), 'lag: W was read by a poll that re-read the overlap before the newest stamp')
	  or diag(join("\n", map { $json->encode($_->{body}{filterGroups}) } @walks));
}
note('section 2b done at ' . elapsed());

# ---------------------------------------------------------------------------
# 3. 10,500 contacts modified in one millisecond: past the 10,000 results of one search
# ---------------------------------------------------------------------------

admin($A, 'POST', 'search_lag', { seconds => 2 });
sql(q{SELECT sync.alter_source('crm', options => '{"overlap": 8, "deleted_interval": 600}')});
my $t_bulk = time;
my $bulk = admin($A, 'POST', 'bulk_update/contacts',
	{ count => $N_BULK, properties => { jobtitle => 'Bulk 10500', hs_lead_status => 'CONNECTED' } });
is(scalar(@{ $bulk->{ids} }), $N_BULK, "bulk_update touched $N_BULK contacts");
my $bms = $bulk->{epochMs};
{
	my %stamps = map { admin($A, 'GET', "records/contacts/$_")->{properties}{lastmodifieddate} => 1 }
	  @{ $bulk->{ids} }[ 0, 5000, $N_BULK - 1 ];
	is(join(',', map { hs_epoch_ms($_) } keys %stamps), $bms, "the $N_BULK contacts share one millisecond");
}
ok(wait_sql(240, "SELECT count(*) = $N_BULK FROM crm.contacts WHERE $col{jobtitle} = 'Bulk 10500' "
	  . "AND $col{hs_lead_status} = 'CONNECTED' AND (extract(epoch FROM $col{lastmodifieddate}) * 1000)::bigint = $bms"),
	sprintf("all $N_BULK bulk-updated contacts arrive with the new values (%.0fs)", time - $t_bulk));
is(sql("SELECT count(*) FROM crm.contacts WHERE $col{jobtitle} = 'Bulk 10500'"), $N_BULK,
	'no other row carries the bulk value');
{
	my $log = log_since($A, $t_bulk);
	my @searches = grep { search_type($_) eq 'contacts' } @$log;
	my @ties = grep { is_tie($_) } @searches;
	my @past = grep { ($_->{body}{after} // 0) + ($_->{body}{limit} // 10) > 10000 } @searches;
	is(scalar(@past), 0, 'no search asked for results past the 10,000th');
	is(scalar(grep { $_->{status} != 200 } @searches), 0, 'every contacts search answered 200')
	  or diag(join("\n", map { brief_entry($_) } grep { $_->{status} != 200 } @searches));
	cmp_ok(scalar(@ties), '>=', int(($N_BULK + 199) / 200),
		'the tie walk read the shared millisecond in pages of 200 by id');
	my @bad_ties = grep
	{
		my %f = map { $_->{propertyName} . ' ' . $_->{operator} => $_->{value} } filters_of($_);
		($f{'lastmodifieddate EQ'} // '') ne $bms
		  || ($_->{body}{sorts}[0]{propertyName} // '') ne 'hs_object_id' || ($_->{body}{limit} // 0) != 200
	} @ties;
	is(scalar(@bad_ties), 0, 'tie queries: lastmodifieddate EQ the bulk millisecond, sorted by hs_object_id, limit 200')
	  or diag($json->encode($bad_ties[0]{body}));
	# Within the first tie walk, the id keyset grows from 0 page by page.
	my @gt = map { my ($f) = grep { $_->{propertyName} eq 'hs_object_id' } filters_of($_); $f->{value} } @ties;
	my $first_walk = 0;
	$first_walk++ while $first_walk < $#gt && $gt[ $first_walk + 1 ] > $gt[$first_walk];
	is($gt[0], 0, 'the tie walk starts at hs_object_id > 0');
	is($first_walk + 1, int(($N_BULK + 199) / 200), "the first tie walk took ceil($N_BULK/200) pages, ids ascending");
}
{
	my $st = status_of('crm', 'contacts');
	ok(!defined $st->{last_error} && $st->{consecutive_failures} == 0, 'contacts: no error through the bulk update')
	  or diag('last_error: ' . ($st->{last_error} // 'none'));
}
note('section 3 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 4. The OAuth access token expires mid-run
# ---------------------------------------------------------------------------

my $pid = sql('SELECT sync.worker_pid()');
ok($pid =~ /^\d+$/, "the worker runs (pid $pid)");
my $tokens_before = admin($A, 'GET', 'stats')->{tokens_issued};
my $t_exp = time;
my $expired = admin($A, 'POST', 'expire_tokens');
cmp_ok($expired->{expired}, '>=', 1, 'the fake expired the access token in use');
# (The contacts collection may still be re-reading the bulk millisecond: the expiry may hit its
# tie walk. The final comparison checks that nothing was lost.)
ok(wait_until(60, sub {
	scalar(grep { $_->{path} =~ m{^/crm/} && $_->{status} == 200 } @{ log_since($A, $t_exp) }) >= 3 }),
	'API calls succeed again after the expiry');
{
	my $log = log_since($A, $t_exp);
	my @i401 = grep { $log->[$_]{status} == 401 } 0 .. $#$log;
	is(scalar(@i401), 1, 'one request met the expired token');
	for my $i (@i401)
	{
		my ($e, $tok, $retry) = @$log[ $i .. $i + 2 ];
		like($e->{path}, qr{^/crm/}, 'the 401 was an API call');
		ok($tok && is_token($tok) && $tok->{method} eq 'POST' && $tok->{status} == 200,
			'the 401 is followed by a token refresh') or diag($tok ? brief_entry($tok) : 'nothing');
		ok($retry && $retry->{path} eq $e->{path} && $retry->{method} eq $e->{method} && $retry->{status} == 200,
			'and by the same request again, answered 200') or diag($retry ? brief_entry($retry) : 'nothing');
	}
	is(scalar(grep { is_token($_) } @$log), 1, 'one token request after the expiry');
	is(admin($A, 'GET', 'stats')->{tokens_issued}, $tokens_before + 1, 'the fake issued one new token');
}
is(sql("SELECT count(*) FROM sync.status WHERE source = 'crm' AND (last_error IS NOT NULL OR consecutive_failures > 0)"),
	0, 'the token refresh recorded no error on any collection');
note('section 4 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 5. Errors are recorded, the worker keeps running, and recovers
# ---------------------------------------------------------------------------

# 429s with HubSpot's rate-limit body on the contacts search.
admin($A, 'POST', 'faults', { path_regex => '^/crm/v3/objects/contacts/search', status => 429, count => 3,
	body => { status => 'error', message => 'You have reached your secondly limit.', errorType => 'RATE_LIMIT',
		correlationId => 'a5b2f6b4-0d0e-4b44-9a55-0123456789ab', policyName => 'SECONDLY' } });
ok(wait_sql(60, "SELECT state = 'rate limited' AND consecutive_failures = 0 "
	  . "AND waiting_on LIKE '%search limit%' "
	  . "AND last_error LIKE '%HTTP 429 RATE_LIMIT: You have reached your secondly limit.%' "
	  . "FROM sync.status WHERE source = 'crm' AND collection = 'contacts'"),
	'contacts: a 429 shows as state rate limited with HubSpot\'s message in last_error')
  or diag('last_error: ' . (status_of('crm', 'contacts')->{last_error} // 'none'));
ok(wait_until(60, sub { admin($A, 'GET', 'faults')->[0]{remaining} == 0 }),
	'contacts: each 429 penalty passed and the step was tried again until all three were served');
{
	my $t_served = time;
	ok(wait_sql(60, "SELECT state = 'syncing' AND consecutive_failures = 0 AND last_poll_at > to_timestamp($t_served) "
		  . "FROM sync.status WHERE source = 'crm' AND collection = 'contacts'"), 'contacts: back to syncing after the 429s');
}
is(join(',', map { "$_->{hits}/$_->{remaining}" } @{ admin($A, 'GET', 'faults') }), '3/0', 'all three 429s were served');
like(status_of('crm', 'contacts')->{last_error} // '', qr/429/, 'last_error keeps the 429 for the record');
my $E2 = admin($A, 'POST', 'records/contacts', { properties => { email => 'after.429@example.com' } })->{id};
ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM crm.contacts WHERE id = $E2)"), 'contacts: a new record syncs after the 429s');
admin($A, 'DELETE', 'faults');

# 502s on every companies request.
admin($A, 'POST', 'faults', { path_regex => '^/crm/v3/objects/companies', status => 502, count => 3 });
ok(wait_sql(60, "SELECT state = 'error' AND last_error LIKE '%HTTP 502 BAD_GATEWAY%' FROM sync.status "
	  . "WHERE source = 'crm' AND collection = 'companies'"), 'companies: a 502 shows as state error')
  or diag('last_error: ' . (status_of('crm', 'companies')->{last_error} // 'none'));
is(status_of('crm', 'contacts')->{consecutive_failures}, 0, 'contacts keep syncing while companies fail');
ok(wait_sql(60, "SELECT state = 'syncing' AND consecutive_failures = 0 FROM sync.status "
	  . "WHERE source = 'crm' AND collection = 'companies'"), 'companies: back to syncing after the 502s');
is(join(',', map { "$_->{hits}/$_->{remaining}" } @{ admin($A, 'GET', 'faults') }), '3/0', 'all three 502s were served');
my $CO_E = admin($A, 'POST', 'records/companies', { properties => { name => 'After 502' } })->{id};
ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM crm.companies WHERE id = $CO_E)"), 'companies: a new record syncs after the 502s');
admin($A, 'DELETE', 'faults');

# A bad refresh token.
my $t_bad = time;
sql(q{SELECT sync.alter_source('crm', credentials => '{"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "revoked"}')});
ok(wait_sql(60, "SELECT bool_and(state = 'error' AND last_error LIKE "
	  . "'%token refresh failed with HTTP 400 BAD_REFRESH_TOKEN: missing or invalid refresh token%') "
	  . "FROM sync.status WHERE source = 'crm'"), 'all four collections show the BAD_REFRESH_TOKEN error')
  or diag(sql("SELECT string_agg(collection || ': ' || coalesce(last_error, 'none'), E'\\n') FROM sync.status WHERE source = 'crm'"));
{
	my $log = log_since($A, $t_bad);
	my ($first_bad) = grep { is_token($log->[$_]) && $log->[$_]{status} == 400 } 0 .. $#$log;
	ok(defined $first_bad, 'the fake refused a token request');
	is(scalar(grep { $_->{path} =~ m{^/crm/} } @$log[ ($first_bad // 0) .. $#$log ]), 0,
		'no API call was made without a token');
}
my $E3 = admin($A, 'POST', 'records/contacts', { properties => { email => 'during.outage@example.com' } })->{id};
my $t_fix = time;
sql("SELECT sync.alter_source('crm', credentials => '$creds')");
ok(wait_sql(60, "SELECT bool_and(state = 'syncing' AND consecutive_failures = 0 AND last_poll_at > to_timestamp($t_fix)) "
	  . "FROM sync.status WHERE source = 'crm'"), 'fixed credentials recover every collection');
ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM crm.contacts WHERE id = $E3)"), 'the contact created during the outage syncs');
is(sql('SELECT sync.worker_pid()'), $pid, 'the same worker kept running through the errors');
note('section 5 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 6. An unknown object type fails add_collection at call time
# ---------------------------------------------------------------------------

{
	my $t_bad_type = time;
	my ($ret, $out, $err) = $node->psql('postgres', "SELECT sync.add_collection('crm', 'no_such_object')");
	isnt($ret, 0, 'add_collection of an unknown object type fails');
	like($err, qr/HubSpot has no object type "no_such_object"/, 'with an error naming the object type');
	is(sql("SELECT count(*) FROM sync.collections c JOIN sync.sources s ON s.id = c.source_id WHERE s.name = 'crm'"), 4,
		'no collection was added');
	is(sql("SELECT to_regclass('crm.no_such_object') IS NULL"), 't', 'no table was created');
	ok(scalar(grep { $_->{path} eq '/crm/v3/properties/no_such_object' && $_->{status} == 400 }
			@{ log_since($A, $t_bad_type) }), 'the API was asked, and answered 400');
}

# ---------------------------------------------------------------------------
# 7. A private-app token source (fake B)
# ---------------------------------------------------------------------------

{
	my $t_pat = time;
	sql("SELECT sync.create_source('pat', 'hubspot', '$B->{url}', '{\"access_token\": \"$PAT\"}', "
		  . "'{\"requests_per_second\": 4, \"poll_interval\": 1}')");
	is(sql("SELECT sync.add_collection('pat', 'deals')"), 'pat.deals', 'pat: add_collection creates pat.deals');
	is(sql("SELECT sync.wait_for_backfill('pat', 'deals', '120s')"), 't', 'pat: backfill completes');
	my $pat_fields = fields_of('pat', 'deals', $kinds{deals});
	my $deals_b = dump_live($B)->{deals};
	is(status_of('pat', 'deals')->{backfill_records}, scalar(@$deals_b), 'pat: backfill_records = ' . scalar(@$deals_b));
	compare_table('backfill of pat.deals', 'pat.deals', $pat_fields, $deals_b);
	my %pc = map { $_->{api_field} => qq{"$_->{column_name}"} } @$pat_fields;
	my $PD = $deals_b->[17]{id};
	admin($B, 'PATCH', "records/deals/$PD", { properties => { amount => '777.77', deal_tags => 'partner' } });
	ok(wait_sql(60, "SELECT $pc{amount} = 777.77 FROM pat.deals WHERE id = $PD"), 'pat: an update arrives');
	compare_table('pat.deals after an update', 'pat.deals', $pat_fields, dump_live($B)->{deals});
	my $log = log_since($B, $t_pat);
	is(scalar(grep { is_token($_) } @$log), 0, 'pat: no OAuth token request');
	cmp_ok(scalar(grep { $_->{path} =~ m{^/crm/} && $_->{status} == 200 } @$log), '>=', 4, 'pat: API calls answered 200');
	is(scalar(grep { $_->{status} != 200 } @$log), 0, 'pat: no request failed');
	my $st = status_of('pat', 'deals');
	ok($st->{state} eq 'syncing' && !defined $st->{last_error}, 'pat: syncing, no error');
}

# A deal purged for good (GDPR delete) leaves no trace in the recycle bin. If the
# bin was last walked more than 90 days ago, deletes may have been purged since:
# the next step sweeps every id instead, and finds this one.
{
	my $deals_b = dump_live($B)->{deals};
	my $gone = $deals_b->[3]{id};
	admin($B, 'DELETE', "records/deals/$gone?hard=1");
	my $sweeps_before = sql("SELECT coalesce(extract(epoch FROM last_sweep_at), 0) FROM sync.status "
		  . "WHERE source = 'pat' AND collection = 'deals'");
	sql("SELECT sync.pause('pat', 'deals')");
	sql("UPDATE sync.collection_state SET cursor = jsonb_set(cursor, '{archived_at}', "
		  . "to_jsonb(extract(epoch FROM now())::float8 - 91 * 86400)) "
		  . "WHERE collection_id = (SELECT id FROM sync.collections WHERE name = 'deals' "
		  . "AND source_id = (SELECT id FROM sync.sources WHERE name = 'pat'))");
	sql("SELECT sync.resume('pat', 'deals')");
	ok(wait_sql(90, "SELECT count(*) = 0 FROM pat.deals WHERE id = $gone"),
		'pat: a purged deal is deleted by the sweep that follows a 91-day gap in recycle-bin walks');
	ok(sql("SELECT extract(epoch FROM last_sweep_at) > $sweeps_before FROM sync.status "
		  . "WHERE source = 'pat' AND collection = 'deals'") eq 't', 'pat: last_sweep_at moved');
	is(sql('SELECT count(*) FROM pat.deals'), scalar(@$deals_b) - 1, 'pat: every other deal is kept');
}
note('section 7 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 8. The whole contacts table once more, and the log of the whole run
# ---------------------------------------------------------------------------

$live = dump_live($A);
ok(wait_until(60, sub {
	my $n = sql('SELECT count(*) FROM crm.contacts');
	return $n == scalar(@{ $live->{contacts} });
}), 'contacts: the row count settles at the fake\'s');
compare_table('crm.contacts at the end', 'crm.contacts', $fields{contacts}, $live->{contacts});
for my $c (qw(companies deals cars))
{
	compare_table("crm.$c at the end", "crm.$c", $fields{$c}, $live->{ $TYPE_OF{$c} });
}
{
	my $log = log_since($A, $t_backfill);
	my @searches = grep { search_type($_) } @$log;
	is(scalar(grep { ($_->{body}{after} // 0) + ($_->{body}{limit} // 10) > 10000 } @searches), 0,
		'in the whole run no search asked for results past the 10,000th');
	is(scalar(grep { $_->{status} == 429 } @$log), 3,
		'the only 429s were the 3 injected ones (the fake\'s own rate limits were never hit)');
	my @wrong_stamp = grep
	{
		my $t = search_type($_);
		my ($f) = filters_of($_);
		$f && $f->{propertyName} =~ /lastmodifieddate$/
		  && $f->{propertyName} ne ($t eq 'contacts' ? 'lastmodifieddate' : 'hs_lastmodifieddate')
	} @searches;
	is(scalar(@wrong_stamp), 0, 'searches filter contacts on lastmodifieddate and other objects on hs_lastmodifieddate');
}
for my $c (sort keys %TYPE_OF)
{
	is(status_of('crm', $c)->{state}, 'syncing', "crm $c ends syncing");
}

note('total ' . elapsed());
$node->stop;
done_testing();
